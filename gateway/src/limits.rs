//! Admission: how many connections may be open, in their handshakes, and
//! from one client address. Shared by every listener.
//!
//! A client address is an IPv4 address or, for IPv6, its network of
//! `server.ipv6_client_prefix` bits (a /64 by default): one IPv6 host
//! usually has a whole /64 to pick source addresses from.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ServerSettings;
use crate::handshake::Refusal;

/// The connection limits of `[server]`.
pub struct Admission {
    /// One permit per connection, in its handshake or open.
    open: Arc<Semaphore>,
    max_connections: usize,
    /// One permit per connection in its handshake.
    handshakes: Arc<Semaphore>,
    /// `server.max_handshakes`.
    max_handshakes: usize,
    /// Open connections (and handshakes) by client address.
    per_ip: Arc<PerIp>,
    /// Connections in their handshake by client address.
    handshakes_per_ip: Arc<PerIp>,
    /// Bits of an IPv6 address that name one client.
    ipv6_prefix: u8,
    /// When a refusal at accept was last logged, and how many since.
    refusals_logged: Mutex<(Option<Instant>, u64)>,
}

/// Refusals at accept are logged at most this often (they come in floods).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A place among one address's handshakes; given back on drop.
pub struct HandshakeSlot {
    _slot: IpSlot,
}

/// What a connection holds while it is admitted; dropping it gives the
/// places back.
pub struct Admitted {
    _open: OwnedSemaphorePermit,
    _ip: IpSlot,
}

impl Admission {
    /// Limits from the settings.
    pub fn new(server: &ServerSettings) -> Self {
        Self {
            open: Arc::new(Semaphore::new(server.max_connections.get())),
            max_connections: server.max_connections.get(),
            handshakes: Arc::new(Semaphore::new(server.max_handshakes.get())),
            max_handshakes: server.max_handshakes.get(),
            per_ip: Arc::new(PerIp {
                max: server.max_connections_per_ip.get(),
                counts: Mutex::new(HashMap::new()),
            }),
            handshakes_per_ip: Arc::new(PerIp {
                max: server.max_handshakes_per_ip.get(),
                counts: Mutex::new(HashMap::new()),
            }),
            ipv6_prefix: server.ipv6_client_prefix,
            refusals_logged: Mutex::new((None, 0)),
        }
    }

    /// Take one of `ip`'s handshake places, right after accept (with the
    /// socket's own place among `server.max_handshakes` already held).
    /// `None` when places are contended (more than half of them in use)
    /// and `ip` already holds `server.max_handshakes_per_ip`: the socket is
    /// then closed at once, before any TLS work. Uncontended, a burst from
    /// one address (many clients behind one NAT) is let through.
    pub fn handshake_slot(&self, ip: IpAddr) -> Option<HandshakeSlot> {
        let client = self.client(ip);
        let contended = self.handshakes.available_permits() < self.max_handshakes / 2;
        let slot = self
            .handshakes_per_ip
            .clone()
            .take_within(client, contended)
            .map(|slot| HandshakeSlot { _slot: slot });
        if slot.is_none() {
            self.log_refusal(client);
        }
        slot
    }

    /// Say, at most every 10 s, that sockets are being closed at accept.
    fn log_refusal(&self, client: IpAddr) {
        let mut logged = self
            .refusals_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        logged.1 += 1;
        if logged
            .0
            .is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                %client,
                refused = logged.1,
                limit = self.handshakes_per_ip.max,
                "handshake places are contended and this address holds server.max_handshakes_per_ip: \
                 its new sockets are closed before TLS (counted in \
                 tidegate_connections_rejected_total{{reason=\"per_ip_handshake_limit\"}})"
            );
            *logged = (Some(Instant::now()), 0);
        }
    }

    /// The address connections are counted under: IPv4 (also when mapped
    /// into IPv6) as is, IPv6 cut to its network.
    fn client(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
            v4 => v4,
        }
    }

    /// Wait for a handshake place: taken before `accept`, so a burst of
    /// clients beyond `server.max_handshakes` waits in the kernel's
    /// backlog instead of costing memory here.
    pub async fn handshake_place(&self) -> Option<OwnedSemaphorePermit> {
        self.handshakes.clone().acquire_owned().await.ok()
    }

    /// Admit a connection from `ip`, or say which HTTP refusal it gets once
    /// its request is read.
    ///
    /// # Errors
    /// A 429 [`Refusal`] over the per-address limit, a 503 one over the
    /// total.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refusal> {
        let ip = self.client(ip);
        let slot = self.per_ip.clone().take(ip).ok_or_else(|| {
            Refusal::http(
                429,
                "per_ip_limit",
                format!(
                    "too many connections from {ip}: the limit is {} (server.max_connections_per_ip)",
                    self.per_ip.max
                ),
            )
        })?;
        let open = self.open.clone().try_acquire_owned().map_err(|_| {
            Refusal::http(
                503,
                "connection_limit",
                format!(
                    "the server is at its limit of {} connections (server.max_connections); try again later",
                    self.max_connections
                ),
            )
        })?;
        Ok(Admitted {
            _open: open,
            _ip: slot,
        })
    }

    /// Connections counted against `ip` now (for tests and metrics).
    pub fn count_for(&self, ip: IpAddr) -> usize {
        self.per_ip.count(self.client(ip))
    }
}

/// Connection counts by client address.
struct PerIp {
    /// Most an address may hold.
    max: usize,
    /// Addresses holding at least one; removed at zero, so the table
    /// only grows with the clients present.
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against an address.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(self: Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.take_within(ip, true)
    }

    /// Count one more for `ip`; refuse at the limit only when `enforce`.
    fn take_within(self: Arc<Self>, ip: IpAddr, enforce: bool) -> Option<IpSlot> {
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let count = counts.entry(ip).or_insert(0);
            if enforce && *count >= self.max {
                return None;
            }
            *count += 1;
        }
        Some(IpSlot { table: self, ip })
    }

    fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::time::Duration;

    use super::*;

    fn settings(total: usize, per_ip: usize) -> ServerSettings {
        ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            plain_listen: None,
            node_id: "n".into(),
            max_connections: NonZeroUsize::new(total).unwrap(),
            max_connections_per_ip: NonZeroUsize::new(per_ip).unwrap(),
            max_handshakes: NonZeroUsize::new(4).unwrap(),
            max_handshakes_per_ip: NonZeroUsize::new(2).unwrap(),
            ipv6_client_prefix: 64,
            proxy_protocol_from: Vec::new(),
            tls_handshake_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            shutdown_grace_period: Duration::from_secs(1),
            drain_window: Duration::ZERO,
            state_dir: "/tmp".into(),
        }
    }

    fn status(result: Result<Admitted, Refusal>) -> u16 {
        match result {
            Ok(_) => 101,
            Err(Refusal::Http { status, .. }) => status,
            Err(other) => panic!("unexpected refusal {other}"),
        }
    }

    #[test]
    fn per_address_and_total_limits_refuse_and_give_places_back() {
        let admission = Admission::new(&settings(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let second = admission.admit(a).unwrap();
        assert_eq!(status(admission.admit(a)), 429);
        assert_eq!(admission.count_for(a), 2);
        let third = admission.admit(b).unwrap();
        // Total reached: b is under its own limit but gets 503.
        assert_eq!(status(admission.admit(b)), 503);
        // A refused attempt does not keep a place.
        assert_eq!(admission.count_for(b), 1);
        drop(first);
        assert_eq!(admission.count_for(a), 1);
        assert_eq!(status(admission.admit(a)), 101);
        drop((second, third));
        assert_eq!(admission.count_for(b), 0);
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_the_ipv4_address() {
        let admission = Admission::new(&settings(10, 1));
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let _held = admission.admit(v4).unwrap();
        assert_eq!(status(admission.admit(mapped)), 429);
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_by_default() {
        let admission = Admission::new(&settings(10, 2));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _first = admission.admit(a).unwrap();
        let _second = admission.admit(same_64).unwrap();
        assert_eq!(status(admission.admit(a)), 429);
        assert_eq!(admission.count_for(same_64), 2);
        assert_eq!(status(admission.admit(other_64)), 101);
    }

    #[test]
    fn the_ipv6_prefix_is_configurable() {
        let mut server = settings(10, 1);
        server.ipv6_client_prefix = 128;
        let admission = Admission::new(&server);
        let _held = admission.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(status(admission.admit("2001:db8::2".parse().unwrap())), 101);
        assert_eq!(status(admission.admit("2001:db8::1".parse().unwrap())), 429);
    }

    #[tokio::test]
    async fn handshake_places_are_limited_per_address_when_contended_and_given_back() {
        // 4 handshake places, 2 per address once more than half are used.
        let admission = Admission::new(&settings(10, 10));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut places = Vec::new();
        let mut slots = Vec::new();
        for _ in 0..2 {
            places.push(admission.handshake_place().await.unwrap());
            slots.push(admission.handshake_slot(a).unwrap());
        }
        // The third socket's own place makes 3 of 4 used: contended.
        places.push(admission.handshake_place().await.unwrap());
        assert!(admission.handshake_slot(a).is_none());
        assert!(
            admission
                .handshake_slot("10.0.0.2".parse().unwrap())
                .is_some()
        );
        drop(slots.remove(0));
        assert!(admission.handshake_slot(a).is_some());
    }

    #[tokio::test]
    async fn uncontended_a_burst_from_one_address_is_let_through() {
        let mut server = settings(100, 100);
        server.max_handshakes = NonZeroUsize::new(64).unwrap();
        let admission = Admission::new(&server);
        let nat: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        // 10 sockets from one address, over its 2, with 10 of 64 places
        // in use: all taken.
        for _ in 0..10 {
            let place = admission.handshake_place().await.unwrap();
            held.push((place, admission.handshake_slot(nat).expect("let through")));
        }
    }
}
