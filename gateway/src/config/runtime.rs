//! `[runtime]`: the function runtime's limits (instances, memory, stack,
//! time, logs), which become [`runtime::RuntimeConfig`] with its defaults,
//! and the gateway's policy when a function fails on a message
//! ([`OnError`], the fault backoff).

use std::num::NonZeroU32;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runtime::RuntimeConfig;
use serde::Deserialize;

use super::{ConfigError, at_least, invalid, positive};

/// Default of `runtime.on_error`.
const ON_ERROR: OnError = OnError::Reply;

/// Default of `runtime.fault_backoff`.
const FAULT_BACKOFF: Duration = Duration::from_secs(1);

/// Default of `runtime.max_state_size`: 64 KiB.
const MAX_STATE_SIZE: usize = 64 << 10;

/// Most `runtime.max_state_size`: 16 MiB (the state is copied into the
/// function for every message).
const MAX_MAX_STATE_SIZE: usize = 16 << 20;

/// Default of `runtime.max_effects`.
const MAX_EFFECTS: usize = 256;

/// Most `runtime.max_effects`.
const MAX_MAX_EFFECTS: usize = 65_536;

/// Default of `runtime.artifact_dir`, under `server.state_dir`.
const ARTIFACT_DIR: &str = "artifacts";

/// Least `runtime.memory_limit`: one WebAssembly page.
const MIN_MEMORY_LIMIT: usize = 1 << 16;

/// The sizes `runtime.max_stack` may take: 64 KiB to 64 MiB.
const STACK_SIZES: RangeInclusive<usize> = 64 << 10..=64 << 20;

/// Least `runtime.max_log_line`, in bytes.
const MIN_LOG_LINE: usize = 80;

/// `[runtime]` as written; `None` takes the default, most of them from
/// [`RuntimeConfig::default`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    /// `runtime.artifact_dir`.
    artifact_dir: Option<PathBuf>,
    /// `runtime.max_instances`, per function.
    max_instances: Option<u32>,
    /// `runtime.max_total_instances`, all functions together.
    max_total_instances: Option<u32>,
    /// `runtime.memory_limit`, bytes per instance.
    memory_limit: Option<usize>,
    /// `runtime.max_stack`, bytes.
    max_stack: Option<usize>,
    /// `runtime.timeout`, e.g. `1s`.
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    /// `runtime.long_call_after`, e.g. `1ms`.
    #[serde(default, with = "humantime_serde")]
    long_call_after: Option<Duration>,
    /// `runtime.long_call_priority`: `lowest` or `normal`.
    #[serde(default, deserialize_with = "super::word")]
    long_call_priority: Option<LongCallPriority>,
    /// `runtime.idle_timeout`, e.g. `30s`.
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    /// `runtime.unload_after`, e.g. `10m`.
    #[serde(default, with = "humantime_serde")]
    unload_after: Option<Duration>,
    /// `runtime.max_log_line`, bytes.
    max_log_line: Option<usize>,
    /// `runtime.max_log_lines_per_second`, per function.
    max_log_lines_per_second: Option<u32>,
    /// `runtime.keep_resident`, bytes per instance.
    keep_resident: Option<usize>,
    /// `runtime.max_queued`, calls per function.
    max_queued: Option<usize>,
    /// `runtime.on_error`: `reply` or `close`.
    #[serde(default, deserialize_with = "super::word")]
    on_error: Option<OnError>,
    /// `runtime.max_state_size`, bytes per connection.
    max_state_size: Option<usize>,
    /// `runtime.max_effects`, per call.
    max_effects: Option<usize>,
    /// `runtime.fault_backoff`, e.g. `1s`.
    #[serde(default, with = "humantime_serde")]
    fault_backoff: Option<Duration>,
}

/// What a client sees when the function fails on its message (a trap, a
/// time or memory limit, a reply over the size limit, an overload):
/// `runtime.on_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// An error reply, `{"error":"function-failed"|"overloaded",...}`, in
    /// place of the function's reply; the connection stays open.
    Reply,
    /// The connection is closed: 1011 for a failure, 1013 for an overload.
    Close,
}

/// The CPU priority of the long-call threads (`runtime.long_call_priority`);
/// the runtime takes it as [`RuntimeConfig::long_call_lowest_priority`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LongCallPriority {
    /// Nice 19: long calls get the CPU everything else leaves over.
    Lowest,
    /// The same priority as the rest of the gateway.
    Normal,
}

/// The `[runtime]` section, validated: what the runtime takes, and what the
/// gateway does when a function fails.
pub(super) struct RuntimeSection {
    /// The runtime's limits.
    pub(super) limits: RuntimeConfig,
    /// `runtime.on_error`.
    pub(super) on_error: OnError,
    /// `runtime.fault_backoff`.
    pub(super) fault_backoff: Duration,
    /// `runtime.max_state_size`.
    pub(super) max_state_size: usize,
    /// `runtime.max_effects`.
    pub(super) max_effects: usize,
}

impl RawRuntime {
    /// The runtime's settings; artifacts default to a folder of `state_dir`.
    pub(super) fn validate(self, state_dir: &Path) -> Result<RuntimeSection, ConfigError> {
        let on_error = self.on_error.unwrap_or(ON_ERROR);
        let fault_backoff = positive("runtime.fault_backoff", self.fault_backoff, FAULT_BACKOFF)?;
        let max_state_size = self.max_state_size.unwrap_or(MAX_STATE_SIZE);
        if max_state_size > MAX_MAX_STATE_SIZE {
            return Err(invalid(
                "runtime.max_state_size",
                format!("{max_state_size} is over the most, {MAX_MAX_STATE_SIZE} (16 MiB)"),
            ));
        }
        let max_effects = self.max_effects.unwrap_or(MAX_EFFECTS);
        if max_effects == 0 || max_effects > MAX_MAX_EFFECTS {
            return Err(invalid(
                "runtime.max_effects",
                format!("{max_effects}: must be 1 to {MAX_MAX_EFFECTS}"),
            ));
        }
        let defaults = RuntimeConfig::default();
        let nz = |key: &str, value: Option<u32>, default: NonZeroU32| match value {
            None => Ok(default),
            Some(v) => NonZeroU32::new(v).ok_or_else(|| invalid(key, "must be at least 1")),
        };
        let max_instances = nz(
            "runtime.max_instances",
            self.max_instances,
            defaults.max_instances,
        )?;
        let max_total_instances = nz(
            "runtime.max_total_instances",
            self.max_total_instances,
            defaults.max_total_instances,
        )?;
        if max_instances > max_total_instances {
            return Err(invalid(
                "runtime.max_instances",
                format!(
                    "{max_instances} is more than runtime.max_total_instances ({max_total_instances})"
                ),
            ));
        }
        let memory_limit = at_least(
            "runtime.memory_limit",
            self.memory_limit,
            defaults.memory_limit,
            MIN_MEMORY_LIMIT,
        )?;
        let idle_timeout = positive(
            "runtime.idle_timeout",
            self.idle_timeout,
            defaults.idle_timeout,
        )?;
        let unload_after = positive(
            "runtime.unload_after",
            self.unload_after,
            defaults.unload_after,
        )?;
        if unload_after < idle_timeout {
            return Err(invalid(
                "runtime.unload_after",
                "must not be shorter than runtime.idle_timeout",
            ));
        }
        let limits = RuntimeConfig {
            artifact_dir: self
                .artifact_dir
                .unwrap_or_else(|| state_dir.join(ARTIFACT_DIR)),
            max_instances,
            max_queued: self.max_queued.unwrap_or(defaults.max_queued),
            max_total_instances,
            memory_limit,
            max_stack: {
                let bytes = self.max_stack.unwrap_or(defaults.max_stack);
                if !STACK_SIZES.contains(&bytes) {
                    return Err(invalid(
                        "runtime.max_stack",
                        format!(
                            "{bytes} is outside {} (64 KiB) to {} (64 MiB)",
                            STACK_SIZES.start(),
                            STACK_SIZES.end()
                        ),
                    ));
                }
                bytes
            },
            timeout: positive("runtime.timeout", self.timeout, defaults.timeout)?,
            long_call_after: self.long_call_after.unwrap_or(defaults.long_call_after),
            long_call_lowest_priority: self
                .long_call_priority
                .map_or(defaults.long_call_lowest_priority, |priority| {
                    priority == LongCallPriority::Lowest
                }),
            idle_timeout,
            unload_after,
            max_log_line: at_least(
                "runtime.max_log_line",
                self.max_log_line,
                defaults.max_log_line,
                MIN_LOG_LINE,
            )?,
            max_log_lines_per_second: nz(
                "runtime.max_log_lines_per_second",
                self.max_log_lines_per_second,
                defaults.max_log_lines_per_second,
            )?,
            keep_resident: {
                let bytes = self.keep_resident.unwrap_or(defaults.keep_resident);
                if bytes > memory_limit {
                    return Err(invalid(
                        "runtime.keep_resident",
                        format!("{bytes} is more than runtime.memory_limit ({memory_limit})"),
                    ));
                }
                bytes
            },
        };
        Ok(RuntimeSection {
            limits,
            on_error,
            fault_backoff,
            max_state_size,
            max_effects,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::{MINIMAL, write};
    use super::*;

    #[test]
    fn guest_log_lines_per_second_default_to_100_and_are_at_least_1() {
        let file = write(MINIMAL);
        let settings = Settings::from_sources(Some(file.path()), vec![], false).unwrap();
        assert_eq!(settings.runtime.max_log_lines_per_second.get(), 100);

        let set = |value: &str| {
            let file = write(MINIMAL);
            let env = vec![(
                "TIDEGATE__RUNTIME__MAX_LOG_LINES_PER_SECOND".into(),
                value.into(),
            )];
            Settings::from_sources(Some(file.path()), env, false)
        };
        let settings = set("20").unwrap();
        assert_eq!(settings.runtime.max_log_lines_per_second.get(), 20);
        let error = set("0").unwrap_err().to_string();
        assert!(
            error.contains("runtime.max_log_lines_per_second"),
            "{error}"
        );
    }

    #[test]
    fn failures_reply_and_long_calls_run_lowest_unless_configured() {
        let runtime = |extra: &str| {
            Settings::from_toml(&format!("{MINIMAL}\n[runtime]\n{extra}"), vec![], false)
        };
        let settings = runtime("").unwrap();
        assert_eq!(settings.on_error, OnError::Reply);
        assert!(settings.runtime.long_call_lowest_priority);
        let settings = runtime("on_error = \"close\"\nlong_call_priority = \"normal\"\n").unwrap();
        assert_eq!(settings.on_error, OnError::Close);
        assert!(!settings.runtime.long_call_lowest_priority);
        let settings = runtime("long_call_priority = \"lowest\"\n").unwrap();
        assert!(settings.runtime.long_call_lowest_priority);
        for (bad, key) in [
            ("on_error = \"Close\"\n", "runtime.on_error"),
            ("on_error = true\n", "runtime.on_error"),
            (
                "long_call_priority = \"high\"\n",
                "runtime.long_call_priority",
            ),
        ] {
            let error = runtime(bad).unwrap_err().to_string();
            assert!(error.contains(key), "{bad}: {error}");
        }
    }

    #[test]
    fn state_and_effects_per_call_have_bounded_defaults() {
        let settings = Settings::from_toml(MINIMAL, vec![], false).unwrap();
        assert_eq!(settings.max_state_size, 64 << 10);
        assert_eq!(settings.max_effects, 256);
        for (key, value) in [
            ("max_effects", "0"),
            ("max_effects", "70000"),
            ("max_state_size", "20000000"),
        ] {
            let text = format!("{MINIMAL}\n[runtime]\n{key} = {value}\n");
            let error = Settings::from_toml(&text, vec![], false)
                .unwrap_err()
                .to_string();
            assert!(error.contains(&format!("runtime.{key}")), "{error}");
        }
    }
}
