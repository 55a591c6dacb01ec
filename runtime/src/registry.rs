//! The functions this node serves, by name, and the task that scales idle
//! functions down to zero.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::artifact;
use crate::config::RuntimeConfig;
use crate::engine::Engine;
use crate::error::LoadError;
use crate::function::Function;
use crate::metrics::RuntimeMetrics;

/// The functions of this node. Loading a function under a name that is
/// already taken replaces it: connections that hold the old version keep
/// it until they are done with it.
pub struct Registry {
    /// Shared engine and linker.
    engine: Arc<Engine>,
    /// Limits and timeouts, shared by every function.
    config: Arc<RuntimeConfig>,
    /// Runtime metrics, registered once.
    metrics: RuntimeMetrics,
    /// The current version of each function.
    functions: RwLock<HashMap<String, Arc<Function>>>,
}

impl Registry {
    /// Build the engine and an empty registry, creating the artifact
    /// directory if needed.
    ///
    /// # Errors
    /// [`LoadError::ArtifactDir`] when the artifact directory cannot be
    /// created or is not safe to load code from (see
    /// [`RuntimeConfig::artifact_dir`]); [`LoadError::Engine`] when the
    /// engine cannot be built.
    pub fn new(config: RuntimeConfig, metrics: RuntimeMetrics) -> Result<Self, LoadError> {
        artifact::prepare_dir(&config.artifact_dir)?;
        let engine = Engine::new(&config)?;
        Ok(Self {
            engine,
            config: Arc::new(config),
            metrics,
            functions: RwLock::new(HashMap::new()),
        })
    }

    /// Compile and register a function, replacing any function of the same
    /// name. Compilation runs on a blocking thread.
    ///
    /// # Errors
    /// A [`LoadError`] naming the function when it is not a valid Tidegate
    /// component or its artifact cannot be written.
    pub async fn load(&self, name: &str, wasm: Vec<u8>) -> Result<Arc<Function>, LoadError> {
        let engine = self.engine.clone();
        let config = self.config.clone();
        let metrics = self.metrics.clone();
        let owned_name = name.to_owned();
        let function = tokio::task::spawn_blocking(move || {
            Function::compile(engine, config, &metrics, &owned_name, wasm.into())
        })
        .await
        .map_err(|e| LoadError::Engine(format!("compilation task failed: {e}")))??;
        let function = Arc::new(function);
        let previous = self.write().insert(name.to_owned(), function.clone());
        if let Some(previous) = previous {
            previous.release_idle();
        }
        tracing::info!(
            function = name,
            version = function.version(),
            "function loaded"
        );
        Ok(function)
    }

    /// The current version of a function.
    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.functions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .cloned()
    }

    /// Every function, in no particular order.
    pub fn all(&self) -> Vec<Arc<Function>> {
        self.functions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Release idle instances and unload idle code, once.
    pub fn scale_down(&self) {
        for function in self.all() {
            function.scale_down();
        }
    }

    /// How often [`Registry::scale_down`] should run so that the idle
    /// timeout and unload delay are honoured to within a quarter of the
    /// shorter one (and at least every second).
    pub fn scale_interval(&self) -> Duration {
        let shortest = self.config.idle_timeout.min(self.config.unload_after);
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Drop every idle instance of every function.
    pub fn release_all_idle(&self) {
        for function in self.all() {
            function.release_idle();
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Function>>> {
        self.functions
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
