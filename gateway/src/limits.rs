//! Admission: how many connections may be open, in their handshakes, and
//! from one client address. Shared by every listener.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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
    per_ip: Arc<PerIp>,
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
            per_ip: Arc::new(PerIp {
                max: server.max_connections_per_ip.get(),
                counts: Mutex::new(HashMap::new()),
            }),
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
        let ip = ip.to_canonical();
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
        self.per_ip.count(ip.to_canonical())
    }
}

/// Connection counts by client address.
struct PerIp {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against an address.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(self: Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let count = counts.entry(ip).or_insert(0);
            if *count >= self.max {
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
            tls_handshake_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            shutdown_grace_period: Duration::from_secs(1),
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
}
