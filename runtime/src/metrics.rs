//! The runtime's Prometheus metrics. They are registered in the registry the
//! gateway passes in; nothing here is global.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Invocation duration buckets, in seconds: 10 µs to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Metrics of the function runtime, labelled by function name (a bounded
/// set: the functions configured on this node).
#[derive(Clone)]
pub struct RuntimeMetrics {
    /// Invocations by function, event (connect, message, disconnect) and
    /// outcome (ok, handler_error, trap, timeout, memory_limit, ...).
    pub invocations: IntCounterVec,
    /// Time spent in the function, including waiting for an instance.
    pub invocation_duration: HistogramVec,
    /// Live instances (idle or busy) per function: 0 when scaled to zero.
    pub instances: IntGaugeVec,
    /// Instances created because no idle one was available.
    pub cold_starts: IntCounterVec,
    /// 1 while a function's compiled code is in memory, 0 once unloaded.
    pub code_loaded: IntGaugeVec,
    /// Times a function's compiled code was loaded from its artifact.
    pub code_loads: IntCounterVec,
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
        let invocations = IntCounterVec::new(
            Opts::new(
                "tidegate_invocations_total",
                "Function invocations by function, event and outcome.",
            ),
            &["function", "event", "outcome"],
        )?;
        let invocation_duration = HistogramVec::new(
            HistogramOpts::new(
                "tidegate_invocation_duration_seconds",
                "Time to run one function event, including waiting for an instance.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["function", "event"],
        )?;
        let instances = IntGaugeVec::new(
            Opts::new(
                "tidegate_function_instances",
                "Live instances of a function, idle or busy; 0 when scaled to zero.",
            ),
            &["function"],
        )?;
        let cold_starts = IntCounterVec::new(
            Opts::new(
                "tidegate_function_cold_starts_total",
                "Instances created because no idle instance was available.",
            ),
            &["function"],
        )?;
        let code_loaded = IntGaugeVec::new(
            Opts::new(
                "tidegate_function_code_loaded",
                "1 while a function's compiled code is in memory, 0 once it is unloaded.",
            ),
            &["function"],
        )?;
        let code_loads = IntCounterVec::new(
            Opts::new(
                "tidegate_function_code_loads_total",
                "Times a function's compiled code was loaded from its precompiled artifact.",
            ),
            &["function"],
        )?;
        registry.register(Box::new(invocations.clone()))?;
        registry.register(Box::new(invocation_duration.clone()))?;
        registry.register(Box::new(instances.clone()))?;
        registry.register(Box::new(cold_starts.clone()))?;
        registry.register(Box::new(code_loaded.clone()))?;
        let long_calls = IntCounterVec::new(
            Opts::new(
                "tidegate_function_long_calls_total",
                "Calls that ran past runtime.long_call_after (or came from a client whose calls keep failing) and finished on the long-call threads (runtime.long_call_priority).",
            ),
            &["function"],
        )?;
        registry.register(Box::new(code_loads.clone()))?;
        let recompiles = IntCounterVec::new(
            Opts::new(
                "tidegate_function_recompiles_total",
                "Times a function was compiled again from its component because its precompiled artifact was missing, damaged, replaced or could not be loaded.",
            ),
            &["function"],
        )?;
        registry.register(Box::new(recompiles.clone()))?;
        registry.register(Box::new(long_calls.clone()))?;
        let log_lines_dropped = IntCounterVec::new(
            Opts::new(
                "tidegate_function_log_lines_dropped_total",
                "Function log lines dropped because the function wrote more than runtime.max_log_lines_per_second.",
            ),
            &["function"],
        )?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        Ok(Self {
            long_calls,
            invocations,
            invocation_duration,
            instances,
            cold_starts,
            code_loaded,
            code_loads,
            recompiles,
            log_lines_dropped,
        })
    }
}
