//! `[server]`: the WebSocket listener: its addresses, connection and
//! handshake limits, client addresses behind a load balancer, time limits
//! of the handshake and of shutdown, and the state directory.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, is_plain_name, non_zero, parse_addr, parse_net, positive};

/// `[server]` as written; `None` takes the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    /// `server.listen`, `ip:port`.
    listen: Option<String>,
    /// `server.plain_listen`, `ip:port`.
    plain_listen: Option<String>,
    /// `server.node_id`.
    node_id: Option<String>,
    /// `server.max_connections`.
    max_connections: Option<usize>,
    /// `server.max_connections_per_ip`.
    max_connections_per_ip: Option<usize>,
    /// `server.max_handshakes`.
    max_handshakes: Option<usize>,
    /// `server.max_handshakes_per_ip`.
    max_handshakes_per_ip: Option<usize>,
    /// `server.ipv6_client_prefix`.
    ipv6_client_prefix: Option<u8>,
    /// `server.proxy_protocol_from`: networks or addresses.
    proxy_protocol_from: Option<Vec<String>>,
    /// `server.tls_handshake_timeout`, e.g. `5s`.
    #[serde(default, with = "humantime_serde")]
    tls_handshake_timeout: Option<Duration>,
    /// `server.handshake_timeout`, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    handshake_timeout: Option<Duration>,
    /// `server.shutdown_grace_period`, e.g. `30s`.
    #[serde(default, with = "humantime_serde")]
    shutdown_grace_period: Option<Duration>,
    /// `server.drain_window`, e.g. `5s`.
    #[serde(default, with = "humantime_serde")]
    drain_window: Option<Duration>,
    /// `server.state_dir`.
    state_dir: Option<PathBuf>,
}

/// The WebSocket listener.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on (`server.listen`).
    pub listen: SocketAddr,
    /// An optional second listener without TLS (`server.plain_listen`),
    /// for deployments where a proxy in front terminates TLS.
    pub plain_listen: Option<SocketAddr>,
    /// This node's id; connection ids and queue headers carry it.
    pub node_id: String,
    /// Most connections, open or in their handshakes
    /// (`server.max_connections`); further clients get HTTP 503.
    pub max_connections: NonZeroUsize,
    /// Most connections from one client IP address
    /// (`server.max_connections_per_ip`); further ones get HTTP 429.
    pub max_connections_per_ip: NonZeroUsize,
    /// Most connections in their TLS or upgrade handshake at once
    /// (`server.max_handshakes`); further clients wait in the accept
    /// backlog.
    pub max_handshakes: NonZeroUsize,
    /// Most connections from one client address in their TLS or upgrade
    /// handshake at once while handshake places are contended (more than
    /// half in use) (`server.max_handshakes_per_ip`); further sockets from
    /// it are then closed at once, without TLS, so one host cannot hold
    /// every handshake place.
    pub max_handshakes_per_ip: NonZeroUsize,
    /// IPv6 clients are counted per network of this prefix length
    /// (`server.ipv6_client_prefix`, 64 by default): one host usually holds
    /// a whole /64, so counting single addresses would not limit it.
    pub ipv6_client_prefix: u8,
    /// Peers that must begin every connection with a PROXY protocol header
    /// (v1 or v2) giving the real client's address
    /// (`server.proxy_protocol_from`, networks such as `10.0.0.0/8`): the
    /// load balancers in front of the gateway. Empty: no PROXY header is
    /// read from anyone.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Longest a client may take for the TLS handshake, from accept.
    pub tls_handshake_timeout: Duration,
    /// Longest a client may take to send its upgrade request after TLS.
    pub handshake_timeout: Duration,
    /// Longest a shutdown may take before remaining connections are cut.
    pub shutdown_grace_period: Duration,
    /// At shutdown, connections are closed (1001) one by one, spread over
    /// this window in random order, so their clients do not all reconnect
    /// in the same second (`server.drain_window`; 0 closes all at once).
    pub drain_window: Duration,
    /// Where state (spool, artifacts, dev certificate) lives by default.
    pub state_dir: PathBuf,
}

impl ServerSettings {
    /// Default of `server.listen`: every interface, the HTTPS port.
    pub const LISTEN: &str = "0.0.0.0:443";
    /// Default of `server.listen` in `--dev`: unprivileged, loopback only.
    pub const DEV_LISTEN: &str = "127.0.0.1:8443";
    /// `server.node_id` when it is not set and the host name is not a
    /// valid id.
    pub const NODE_ID: &str = "tidegate";
    /// Default of `server.state_dir` outside `--dev`.
    pub const STATE_DIR: &str = "/var/lib/tidegate";
    /// Default of `server.max_connections`.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// Default of `server.max_connections_per_ip`.
    pub const MAX_CONNECTIONS_PER_IP: usize = 1_000;
    /// Default of `server.max_handshakes`.
    pub const MAX_HANDSHAKES: usize = 1_024;
    /// Default of `server.max_handshakes_per_ip`. It is enforced only while
    /// more than half of the handshake places are in use, so a burst of
    /// reconnects behind one NAT address passes when places are free, and
    /// under a flood it takes 32 addresses to hold every place.
    pub const MAX_HANDSHAKES_PER_IP: usize = 32;
    /// Default of `server.ipv6_client_prefix`.
    pub const IPV6_CLIENT_PREFIX: u8 = 64;
    /// The values `server.ipv6_client_prefix` may take.
    pub const IPV6_CLIENT_PREFIXES: RangeInclusive<u8> = 1..=128;
    /// Default of `server.tls_handshake_timeout`.
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default of `server.handshake_timeout`.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of `server.shutdown_grace_period`.
    pub const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(30);
    /// Default of `server.drain_window`.
    pub const DRAIN_WINDOW: Duration = Duration::from_secs(5);
}

impl RawServer {
    /// The listener's settings; `--dev` changes the defaults of the address
    /// and the state directory.
    pub(super) fn validate(self, dev: bool) -> Result<ServerSettings, ConfigError> {
        let default_listen = if dev {
            ServerSettings::DEV_LISTEN
        } else {
            ServerSettings::LISTEN
        };
        let listen = parse_addr(
            "server.listen",
            self.listen.as_deref().unwrap_or(default_listen),
        )?;
        let node_id = match self.node_id {
            Some(id) => id,
            None => hostname::get()
                .ok()
                .and_then(|name| name.into_string().ok())
                .unwrap_or_else(|| ServerSettings::NODE_ID.into()),
        };
        if !is_plain_name(&node_id) {
            return Err(invalid(
                "server.node_id",
                format!("{node_id:?}: use letters, digits, '-' and '_' only"),
            ));
        }
        let state_dir = match self.state_dir {
            Some(dir) => dir,
            None if dev => dev_state_dir(
                std::env::var_os("XDG_STATE_HOME"),
                std::env::var_os("HOME"),
                listen.port(),
            )?,
            None => PathBuf::from(ServerSettings::STATE_DIR),
        };
        let plain_listen = self
            .plain_listen
            .as_deref()
            .map(|addr| parse_addr("server.plain_listen", addr))
            .transpose()?;
        if plain_listen.is_some_and(|plain| plain == listen && plain.port() != 0) {
            return Err(invalid(
                "server.plain_listen",
                "must differ from server.listen",
            ));
        }
        let shutdown_grace_period = positive(
            "server.shutdown_grace_period",
            self.shutdown_grace_period,
            ServerSettings::SHUTDOWN_GRACE_PERIOD,
        )?;
        // Connections get 80% of the grace period; the window must leave
        // them time to finish after their close.
        let drain_window = self
            .drain_window
            .unwrap_or(ServerSettings::DRAIN_WINDOW.min(shutdown_grace_period.mul_f64(0.5)));
        if drain_window > shutdown_grace_period.mul_f64(0.5) {
            return Err(invalid(
                "server.drain_window",
                format!(
                    "{} is more than half of server.shutdown_grace_period ({}): connections \
                     closed last would have no time to finish",
                    humantime::format_duration(drain_window),
                    humantime::format_duration(shutdown_grace_period)
                ),
            ));
        }
        Ok(ServerSettings {
            listen,
            plain_listen,
            node_id,
            max_connections: non_zero(
                "server.max_connections",
                self.max_connections,
                ServerSettings::MAX_CONNECTIONS,
            )?,
            max_connections_per_ip: non_zero(
                "server.max_connections_per_ip",
                self.max_connections_per_ip,
                ServerSettings::MAX_CONNECTIONS_PER_IP,
            )?,
            max_handshakes: non_zero(
                "server.max_handshakes",
                self.max_handshakes,
                ServerSettings::MAX_HANDSHAKES,
            )?,
            max_handshakes_per_ip: non_zero(
                "server.max_handshakes_per_ip",
                self.max_handshakes_per_ip,
                ServerSettings::MAX_HANDSHAKES_PER_IP,
            )?,
            ipv6_client_prefix: {
                let prefix = self
                    .ipv6_client_prefix
                    .unwrap_or(ServerSettings::IPV6_CLIENT_PREFIX);
                if !ServerSettings::IPV6_CLIENT_PREFIXES.contains(&prefix) {
                    return Err(invalid(
                        "server.ipv6_client_prefix",
                        format!(
                            "{prefix} is not a prefix length; expected {} to {}",
                            ServerSettings::IPV6_CLIENT_PREFIXES.start(),
                            ServerSettings::IPV6_CLIENT_PREFIXES.end()
                        ),
                    ));
                }
                prefix
            },
            proxy_protocol_from: self
                .proxy_protocol_from
                .unwrap_or_default()
                .iter()
                .map(|net| parse_net("server.proxy_protocol_from", net))
                .collect::<Result<_, _>>()?,
            tls_handshake_timeout: positive(
                "server.tls_handshake_timeout",
                self.tls_handshake_timeout,
                ServerSettings::TLS_HANDSHAKE_TIMEOUT,
            )?,
            handshake_timeout: positive(
                "server.handshake_timeout",
                self.handshake_timeout,
                ServerSettings::HANDSHAKE_TIMEOUT,
            )?,
            shutdown_grace_period,
            drain_window,
            state_dir,
        })
    }
}

/// The state directory of `--dev` without `server.state_dir`: the user's
/// own (`$XDG_STATE_HOME/tidegate/dev/<port>`, else
/// `~/.local/state/tidegate/dev/<port>`), never a shared temporary
/// directory where another user could plant files.
fn dev_state_dir(
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    port: u16,
) -> Result<PathBuf, ConfigError> {
    let base = match (xdg_state_home, home) {
        (Some(state), _) if Path::new(&state).is_absolute() => PathBuf::from(state),
        (_, Some(home)) if Path::new(&home).is_absolute() => {
            PathBuf::from(home).join(".local").join("state")
        }
        _ => {
            return Err(invalid(
                "server.state_dir",
                "--dev keeps its state in $XDG_STATE_HOME or $HOME, and neither is set: \
                 set server.state_dir (TIDEGATE__SERVER__STATE_DIR) to a directory of your own",
            ));
        }
    };
    Ok(base.join("tidegate").join("dev").join(port.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::{MINIMAL, write};
    use super::*;

    #[test]
    fn dev_state_is_kept_in_the_users_own_directory() {
        let dir = dev_state_dir(None, Some("/home/ann".into()), 8443).unwrap();
        assert_eq!(
            dir,
            PathBuf::from("/home/ann/.local/state/tidegate/dev/8443")
        );
        let dir = dev_state_dir(Some("/xdg".into()), Some("/home/ann".into()), 8443).unwrap();
        assert_eq!(dir, PathBuf::from("/xdg/tidegate/dev/8443"));
        // A relative XDG_STATE_HOME is invalid by the XDG rules: ignored.
        let dir = dev_state_dir(Some("rel".into()), Some("/home/ann".into()), 1).unwrap();
        assert_eq!(dir, PathBuf::from("/home/ann/.local/state/tidegate/dev/1"));
        let error = dev_state_dir(None, None, 8443).unwrap_err();
        assert!(error.to_string().contains("server.state_dir"), "{error}");
        // And never the shared temporary directory.
        let settings = Settings::from_toml("", vec![], true).unwrap();
        assert!(
            !settings.server.state_dir.starts_with(std::env::temp_dir()),
            "{}",
            settings.server.state_dir.display()
        );
    }

    #[test]
    fn client_address_settings_have_defaults_and_take_networks() {
        let file = write(MINIMAL);
        let settings = Settings::from_sources(Some(file.path()), vec![], false).unwrap();
        assert_eq!(settings.server.max_handshakes_per_ip.get(), 32);
        assert_eq!(settings.server.ipv6_client_prefix, 64);
        assert!(settings.server.proxy_protocol_from.is_empty());
        let env = vec![(
            "TIDEGATE__SERVER__PROXY_PROTOCOL_FROM".into(),
            "10.0.0.0/8, 192.0.2.7,fd00::/8".into(),
        )];
        let settings = Settings::from_sources(Some(file.path()), env, false).unwrap();
        let nets: Vec<String> = settings
            .server
            .proxy_protocol_from
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]);
    }

    #[test]
    fn the_drain_window_is_5s_and_at_most_half_the_grace_period() {
        let settings = Settings::from_toml(MINIMAL, vec![], false).unwrap();
        assert_eq!(settings.server.drain_window, Duration::from_secs(5));
        let text = format!("{MINIMAL}\n[server]\nshutdown_grace_period = \"4s\"\n");
        let settings = Settings::from_toml(&text, vec![], false).unwrap();
        assert_eq!(settings.server.drain_window, Duration::from_secs(2));
        let text = format!("{MINIMAL}\n[server]\ndrain_window = \"0s\"\n");
        let settings = Settings::from_toml(&text, vec![], false).unwrap();
        assert_eq!(settings.server.drain_window, Duration::ZERO);
        let text = format!(
            "{MINIMAL}\n[server]\nshutdown_grace_period = \"10s\"\ndrain_window = \"6s\"\n"
        );
        let error = Settings::from_toml(&text, vec![], false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("server.drain_window"), "{error}");
    }
}
