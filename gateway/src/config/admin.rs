//! `[admin]`: the admin listener (`/metrics`, `/healthz`, `/readyz` and the
//! management API under `/v1/`), its token, and the bounds that keep it
//! from using up the process's file descriptors.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, at_least, invalid, non_zero, parse_addr, positive};

/// `[admin]` as written; `None` takes the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    /// `admin.listen`, `ip:port`.
    listen: Option<String>,
    /// `admin.token`.
    token: Option<String>,
    /// `admin.max_connections`.
    max_connections: Option<usize>,
    /// `admin.header_timeout`, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    header_timeout: Option<Duration>,
    /// `admin.max_upload_size`, bytes.
    max_upload_size: Option<usize>,
    /// `admin.max_versions`.
    max_versions: Option<usize>,
}

/// The admin listener. Its `Debug` shows no token.
#[derive(Clone)]
pub struct AdminSettings {
    /// Address of `/metrics`, `/healthz`, `/readyz` and `/v1/`.
    pub listen: SocketAddr,
    /// Bearer token of the management API; without one `/v1/` is off.
    pub token: Option<String>,
    /// Most admin connections open at once (`admin.max_connections`);
    /// further ones wait in the accept backlog, so the admin listener
    /// cannot use up the process's file descriptors.
    pub max_connections: NonZeroUsize,
    /// Longest a client may take to send a request head, also between
    /// requests on a kept-alive connection (`admin.header_timeout`).
    pub header_timeout: Duration,
    /// Largest component `PUT /v1/functions/{name}` takes, in bytes
    /// (`admin.max_upload_size`); a larger one is refused with 413.
    pub max_upload_size: usize,
    /// Most versions an uploaded function keeps (`admin.max_versions`): an
    /// upload beyond deletes the oldest that are not live, so repeated
    /// deploys do not fill the disk.
    pub max_versions: NonZeroUsize,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Named field by field, so a new one is not forgotten here.
        let Self {
            listen,
            token,
            max_connections,
            header_timeout,
            max_upload_size,
            max_versions,
        } = self;
        f.debug_struct("AdminSettings")
            .field("listen", listen)
            .field("token", &token.as_ref().map(|_| super::REDACTED))
            .field("max_connections", max_connections)
            .field("header_timeout", header_timeout)
            .field("max_upload_size", max_upload_size)
            .field("max_versions", max_versions)
            .finish()
    }
}

impl AdminSettings {
    /// Default of `admin.listen`: loopback only.
    pub const LISTEN: &str = "127.0.0.1:9090";
    /// Shortest `admin.token`, in characters.
    pub const MIN_TOKEN_LEN: usize = 16;
    /// Default of `admin.max_connections`: probes, a scraper and a few
    /// operators, with room to spare.
    pub const MAX_CONNECTIONS: usize = 64;
    /// Default of `admin.header_timeout`.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of `admin.max_upload_size`: 64 MiB, room for JavaScript and
    /// Python components (12 to 18 MB).
    pub const MAX_UPLOAD_SIZE: usize = 64 << 20;
    /// Least `admin.max_upload_size`: the smallest useful component is
    /// tens of kilobytes.
    pub const MIN_UPLOAD_SIZE: usize = 1 << 10;
    /// Default of `admin.max_versions`: room to roll back across many
    /// deploys.
    pub const MAX_VERSIONS: usize = 16;
}

impl RawAdmin {
    /// The admin listener's settings.
    pub(super) fn validate(self) -> Result<AdminSettings, ConfigError> {
        Ok(AdminSettings {
            listen: parse_addr(
                "admin.listen",
                self.listen.as_deref().unwrap_or(AdminSettings::LISTEN),
            )?,
            token: match self.token {
                Some(token) if token.len() < AdminSettings::MIN_TOKEN_LEN => {
                    return Err(invalid(
                        "admin.token",
                        format!(
                            "must be at least {} characters (use a random string)",
                            AdminSettings::MIN_TOKEN_LEN
                        ),
                    ));
                }
                token => token,
            },
            max_connections: non_zero(
                "admin.max_connections",
                self.max_connections,
                AdminSettings::MAX_CONNECTIONS,
            )?,
            header_timeout: positive(
                "admin.header_timeout",
                self.header_timeout,
                AdminSettings::HEADER_TIMEOUT,
            )?,
            max_upload_size: at_least(
                "admin.max_upload_size",
                self.max_upload_size,
                AdminSettings::MAX_UPLOAD_SIZE,
                AdminSettings::MIN_UPLOAD_SIZE,
            )?,
            max_versions: non_zero(
                "admin.max_versions",
                self.max_versions,
                AdminSettings::MAX_VERSIONS,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::MINIMAL;

    #[test]
    fn uploads_are_limited_to_64_mib_unless_set() {
        let settings = Settings::from_toml(MINIMAL, vec![], false).unwrap();
        assert_eq!(settings.admin.max_upload_size, 64 << 20);
        let text = format!("{MINIMAL}\n[admin]\nmax_upload_size = 2097152\n");
        let settings = Settings::from_toml(&text, vec![], false).unwrap();
        assert_eq!(settings.admin.max_upload_size, 2 << 20);
        let text = format!("{MINIMAL}\n[admin]\nmax_upload_size = 10\n");
        let error = Settings::from_toml(&text, vec![], false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("admin.max_upload_size"), "{error}");
    }

    #[test]
    fn a_function_keeps_16_versions_unless_set_and_never_none() {
        let settings = Settings::from_toml(MINIMAL, vec![], false).unwrap();
        assert_eq!(settings.admin.max_versions.get(), 16);
        let text = format!("{MINIMAL}\n[admin]\nmax_versions = 3\n");
        let settings = Settings::from_toml(&text, vec![], false).unwrap();
        assert_eq!(settings.admin.max_versions.get(), 3);
        let text = format!("{MINIMAL}\n[admin]\nmax_versions = 0\n");
        let error = Settings::from_toml(&text, vec![], false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("admin.max_versions"), "{error}");
    }
}
