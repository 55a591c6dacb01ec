//! `[cluster]`: several nodes as one platform, tied together through the
//! broker of `queue.url` (see [`crate::cluster`]).

use std::time::Duration;

use serde::Deserialize;

use super::{AdminSettings, ConfigError, invalid, is_plain_name, positive};

/// `[cluster]` as written; `None` takes the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    /// `cluster.enabled`.
    enabled: Option<bool>,
    /// `cluster.name`.
    name: Option<String>,
    /// `cluster.heartbeat_interval`, e.g. `2s`.
    #[serde(default, with = "humantime_serde")]
    heartbeat_interval: Option<Duration>,
    /// `cluster.node_expiry`, e.g. `7s`.
    #[serde(default, with = "humantime_serde")]
    node_expiry: Option<Duration>,
    /// `cluster.request_timeout`, e.g. `5s`.
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    /// `cluster.admin_url`.
    admin_url: Option<String>,
    /// `cluster.rebalance`.
    rebalance: Option<bool>,
    /// `cluster.rebalance_rate`, connections per second.
    rebalance_rate: Option<usize>,
}

/// The cluster this node is part of.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Whether this node joins a cluster (`cluster.enabled`, default
    /// false): off, it serves its own connections only.
    pub enabled: bool,
    /// The cluster's name (`cluster.name`, required when enabled): the
    /// prefix of the exchanges and queues its nodes share on the broker.
    /// Nodes of one cluster give the same name; two clusters on one broker
    /// give different ones.
    pub name: String,
    /// How often the node announces itself (`cluster.heartbeat_interval`).
    pub heartbeat_interval: Duration,
    /// How long after its last announcement a node is dropped from the
    /// view (`cluster.node_expiry`).
    pub node_expiry: Duration,
    /// Longest the management API waits for another node's answer about
    /// one of its connections (`cluster.request_timeout`).
    pub request_timeout: Duration,
    /// The address of this node's admin API as the others list it
    /// (`cluster.admin_url`).
    pub admin_url: String,
    /// Whether a node holding more than its share of the cluster's
    /// connections sheds the excess with 1012 so that they reconnect to a
    /// node with room (`cluster.rebalance`, default false).
    pub rebalance: bool,
    /// Most connections a node sheds per second when rebalancing
    /// (`cluster.rebalance_rate`).
    pub rebalance_rate: std::num::NonZeroUsize,
}

impl ClusterSettings {
    /// Default of `cluster.name`.
    pub const NAME: &str = "tidegate";
    /// Default of `cluster.heartbeat_interval`.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
    /// Default of `cluster.request_timeout`.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default `cluster.node_expiry`: this many heartbeat intervals,
    /// and a half (so one late heartbeat is not a departure).
    pub const EXPIRY_INTERVALS: f64 = 3.5;
    /// Default of `cluster.rebalance_rate`.
    pub const REBALANCE_RATE: usize = 10;
}

impl RawCluster {
    /// The cluster's settings; the admin listener gives the default
    /// `cluster.admin_url`.
    pub(super) fn validate(self, admin: &AdminSettings) -> Result<ClusterSettings, ConfigError> {
        let enabled = self.enabled.unwrap_or(false);
        // No default for a cluster that is on: two clusters on one broker
        // with the same name would merge, registry and all.
        let name = match self.name {
            Some(name) => name,
            None if enabled => {
                return Err(invalid(
                    "cluster.name",
                    "cluster.enabled needs cluster.name: the name every node of this cluster \
                     gives, and no other cluster on the same broker (e.g. \"prod-eu\")",
                ));
            }
            None => ClusterSettings::NAME.into(),
        };
        if !is_plain_name(&name) || name.len() > 64 {
            return Err(invalid(
                "cluster.name",
                format!("{name:?}: 1 to 64 letters, digits, '-' and '_'"),
            ));
        }
        let heartbeat_interval = positive(
            "cluster.heartbeat_interval",
            self.heartbeat_interval,
            ClusterSettings::HEARTBEAT_INTERVAL,
        )?;
        let node_expiry = positive(
            "cluster.node_expiry",
            self.node_expiry,
            heartbeat_interval.mul_f64(ClusterSettings::EXPIRY_INTERVALS),
        )?;
        if node_expiry <= heartbeat_interval * 2 {
            return Err(invalid(
                "cluster.node_expiry",
                format!(
                    "{} must be more than two heartbeat intervals ({} each): a node would drop \
                     out of the view after one late heartbeat",
                    humantime::format_duration(node_expiry),
                    humantime::format_duration(heartbeat_interval)
                ),
            ));
        }
        let request_timeout = positive(
            "cluster.request_timeout",
            self.request_timeout,
            ClusterSettings::REQUEST_TIMEOUT,
        )?;
        let admin_url = self
            .admin_url
            .unwrap_or_else(|| format!("http://{}", admin.listen));
        if reqwest::Url::parse(&admin_url).is_err() {
            return Err(invalid(
                "cluster.admin_url",
                format!("{admin_url:?} is not a URL, e.g. http://10.0.0.5:9090"),
            ));
        }
        Ok(ClusterSettings {
            enabled,
            name,
            heartbeat_interval,
            node_expiry,
            request_timeout,
            admin_url,
            rebalance: self.rebalance.unwrap_or(false),
            rebalance_rate: super::non_zero(
                "cluster.rebalance_rate",
                self.rebalance_rate,
                ClusterSettings::REBALANCE_RATE,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::MINIMAL;

    #[test]
    fn a_cluster_is_off_unless_enabled_and_its_timings_hold_together() {
        let settings = Settings::from_toml(MINIMAL, vec![], false).unwrap();
        let cluster = &settings.cluster;
        assert!(!cluster.enabled);
        assert_eq!(cluster.name, "tidegate");
        assert_eq!(cluster.node_expiry, std::time::Duration::from_secs(7));
        assert_eq!(cluster.admin_url, "http://127.0.0.1:9090");
        assert!(!cluster.rebalance);
        assert_eq!(cluster.rebalance_rate.get(), 10);

        let text = format!("{MINIMAL}\n[cluster]\nenabled = true\n");
        let error = Settings::from_toml(&text, vec![], false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("cluster.name"), "{error}");
        let text = format!(
            "{MINIMAL}\n[cluster]\nenabled = true\nname = \"blue\"\nheartbeat_interval = \"1s\"\n"
        );
        let settings = Settings::from_toml(&text, vec![], false).unwrap();
        assert!(settings.cluster.enabled);
        assert_eq!(
            settings.cluster.node_expiry,
            std::time::Duration::from_millis(3500)
        );

        for (bad, key) in [
            ("name = \"a.b\"", "cluster.name"),
            (
                "heartbeat_interval = \"2s\"\nnode_expiry = \"3s\"",
                "cluster.node_expiry",
            ),
            ("request_timeout = \"0s\"", "cluster.request_timeout"),
            ("admin_url = \"not a url\"", "cluster.admin_url"),
            ("rebalance_rate = 0", "cluster.rebalance_rate"),
        ] {
            let text = format!("{MINIMAL}\n[cluster]\n{bad}\n");
            let error = Settings::from_toml(&text, vec![], false)
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{bad}: {error}");
        }
    }
}
