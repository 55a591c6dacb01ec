//! The runtime's Prometheus metrics. They are registered in the registry the
//! gateway passes in; nothing here is global.
//!
//! Counts that belong to one function version carry a `version` label as
//! well as `function`: the versions a node holds are bounded by what was
//! uploaded and not deleted, and a deleted version's series are removed
//! ([`RuntimeMetrics::remove_version`]).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Invocation duration buckets, in seconds: 10 µs to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `event` label of `tidegate_invocations_total`.
pub(crate) const EVENTS: &[&str] = &["connect", "message", "disconnect"];

/// The `outcome` label of `tidegate_invocations_total`: `ok` and every
/// [`crate::InvokeError::kind`].
pub(crate) const OUTCOMES: &[&str] = &[
    "ok",
    "trap",
    "stack_overflow",
    "panic",
    "overloaded",
    "timeout",
    "memory_limit",
    "load_error",
    "instantiate_error",
    "shutdown",
];

/// Metrics of the function runtime, labelled by function name and, where a
/// count is per version, by version (both bounded: the functions and
/// versions this node holds).
#[derive(Clone)]
pub struct RuntimeMetrics {
    /// Invocations by function, version, event (connect, message,
    /// disconnect) and outcome (ok, trap, timeout, memory_limit, ...).
    pub invocations: IntCounterVec,
    /// Time spent in the function, including waiting for an instance.
    pub invocation_duration: HistogramVec,
    /// Live instances (idle or busy) per function version: 0 when scaled
    /// to zero, and once the version is no longer live and its last call
    /// has ended.
    pub instances: IntGaugeVec,
    /// Instances created because no idle one was available.
    pub cold_starts: IntCounterVec,
    /// 1 while a function version's compiled code is in memory, 0 once
    /// unloaded.
    pub code_loaded: IntGaugeVec,
    /// Times a function version's compiled code was loaded from its
    /// artifact (after an unload, or at start-up).
    pub code_loads: IntCounterVec,
    /// Times a function version was compiled from its component: when it is
    /// uploaded or configured, when no usable artifact is found at start-up
    /// (none, another engine, damaged), and after a failed reload.
    pub compiles: IntCounterVec,
    /// Times a function was compiled again from its component because its
    /// artifact was missing, damaged, replaced or could not be loaded.
    pub recompiles: IntCounterVec,
    /// Calls that finished on the long-call threads.
    pub long_calls: IntCounterVec,
    /// Guest log lines dropped over `runtime.max_log_lines_per_second`.
    pub log_lines_dropped: IntCounterVec,
}

impl RuntimeMetrics {
    /// Create the metrics and register them.
    ///
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let per_version = &["function", "version"];
        let counter = |name: &str, help: &str| {
            let counter = IntCounterVec::new(Opts::new(name, help), per_version)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(counter)
        };
        let gauge = |name: &str, help: &str| {
            let gauge = IntGaugeVec::new(Opts::new(name, help), per_version)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok::<_, prometheus::Error>(gauge)
        };
        let invocations = IntCounterVec::new(
            Opts::new(
                "tidegate_invocations_total",
                "Function invocations by function, version, event and outcome.",
            ),
            &["function", "version", "event", "outcome"],
        )?;
        registry.register(Box::new(invocations.clone()))?;
        let invocation_duration = HistogramVec::new(
            HistogramOpts::new(
                "tidegate_invocation_duration_seconds",
                "Time to run one function event, including waiting for an instance.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["function", "event"],
        )?;
        registry.register(Box::new(invocation_duration.clone()))?;
        let log_lines_dropped = IntCounterVec::new(
            Opts::new(
                "tidegate_function_log_lines_dropped_total",
                "Function log lines dropped because the function wrote more than runtime.max_log_lines_per_second.",
            ),
            &["function"],
        )?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        Ok(Self {
            invocations,
            invocation_duration,
            instances: gauge(
                "tidegate_function_instances",
                "Live instances of a function version, idle or busy; 0 when scaled to zero or no longer live.",
            )?,
            cold_starts: counter(
                "tidegate_function_cold_starts_total",
                "Instances created because no idle instance was available.",
            )?,
            code_loaded: gauge(
                "tidegate_function_code_loaded",
                "1 while a function version's compiled code is in memory, 0 once it is unloaded.",
            )?,
            code_loads: counter(
                "tidegate_function_code_loads_total",
                "Times a function version's compiled code was loaded from its precompiled artifact.",
            )?,
            compiles: counter(
                "tidegate_function_compiles_total",
                "Times a function version was compiled from its component (uploaded, configured, or without a usable precompiled artifact).",
            )?,
            recompiles: counter(
                "tidegate_function_recompiles_total",
                "Times a function was compiled again from its component because its precompiled artifact was missing, damaged, replaced or could not be loaded.",
            )?,
            long_calls: counter(
                "tidegate_function_long_calls_total",
                "Calls that ran past runtime.long_call_after (or came from a client whose calls keep failing) and finished on the long-call threads (runtime.long_call_priority).",
            )?,
            log_lines_dropped,
        })
    }

    /// Remove every series of a deleted function version, so that the
    /// series a node exports stay bounded by the versions it holds.
    pub(crate) fn remove_version(&self, function: &str, version: &str) {
        let pair = [function, version];
        for vec in [
            &self.cold_starts,
            &self.code_loads,
            &self.compiles,
            &self.recompiles,
            &self.long_calls,
        ] {
            let _ = vec.remove_label_values(&pair);
        }
        for vec in [&self.instances, &self.code_loaded] {
            let _ = vec.remove_label_values(&pair);
        }
        for event in EVENTS {
            for outcome in OUTCOMES {
                let _ = self
                    .invocations
                    .remove_label_values(&[function, version, event, outcome]);
            }
        }
    }

    /// Remove the series of a deleted function that are not per version.
    pub(crate) fn remove_function(&self, function: &str) {
        for event in EVENTS {
            let _ = self
                .invocation_duration
                .remove_label_values(&[function, event]);
        }
        let _ = self.log_lines_dropped.remove_label_values(&[function]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InvokeError;

    #[test]
    fn every_outcome_is_listed_for_removal() {
        let errors = [
            InvokeError::Trap {
                function: String::new(),
                reason: String::new(),
            },
            InvokeError::StackOverflow {
                function: String::new(),
            },
            InvokeError::Panic {
                function: String::new(),
            },
            InvokeError::Overloaded {
                function: String::new(),
                queued: 0,
            },
            InvokeError::Timeout {
                function: String::new(),
                limit_ms: 0,
            },
            InvokeError::MemoryLimit {
                function: String::new(),
                limit_bytes: 0,
            },
            InvokeError::Load(crate::LoadError::Engine(String::new())),
            InvokeError::ShuttingDown {
                function: String::new(),
            },
            InvokeError::Instantiate {
                function: String::new(),
                reason: String::new(),
            },
        ];
        for error in errors {
            assert!(OUTCOMES.contains(&error.kind()), "{}", error.kind());
        }
    }

    #[test]
    fn a_removed_version_leaves_no_series() {
        let registry = Registry::new();
        let metrics = RuntimeMetrics::register(&registry).unwrap();
        metrics.instances.with_label_values(&["f", "v1"]).set(2);
        metrics
            .invocations
            .with_label_values(&["f", "v1", "message", "timeout"])
            .inc();
        metrics.instances.with_label_values(&["f", "v2"]).set(1);
        metrics.remove_version("f", "v1");
        let text = registry
            .gather()
            .iter()
            .flat_map(|family| family.get_metric().iter())
            .flat_map(|metric| metric.get_label().iter())
            .filter(|label| label.name() == "version")
            .map(|label| label.value().to_owned())
            .collect::<Vec<_>>();
        assert_eq!(text, vec!["v2".to_owned()]);
    }
}
