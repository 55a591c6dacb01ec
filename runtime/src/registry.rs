//! The functions this node serves, by name, each with its versions and the
//! one that is live, and the task that scales idle functions down to zero.
//!
//! A call looks up the live version ([`Registry::get`]: one read lock and a
//! reference count) and holds it until the call ends, so a version that
//! stops being live finishes the calls it started; its idle instances go
//! at once, its busy ones as their calls end, and its code with the last
//! of them. A version that is not live holds no instances and no code (it
//! is loaded back from its artifact if it goes live again).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::artifact;
use crate::config::RuntimeConfig;
use crate::engine::Engine;
use crate::error::{InvokeError, LoadError};
use crate::function::{Function, Keep, Readiness};
use crate::metrics::RuntimeMetrics;

/// The functions of this node, with their versions.
pub struct Registry {
    /// Shared engine and linker.
    engine: Arc<Engine>,
    /// Limits and timeouts, shared by every function.
    config: Arc<RuntimeConfig>,
    /// Runtime metrics, registered once.
    metrics: RuntimeMetrics,
    /// Every function by name.
    functions: RwLock<HashMap<String, Named>>,
}

/// One function: its versions and the live one.
struct Named {
    /// The version calls go to; `None` until one is made live.
    live: Option<Arc<Function>>,
    /// Every version, oldest first.
    versions: Vec<Version>,
}

/// One version of a function.
#[derive(Clone)]
pub struct Version {
    /// The loaded version.
    pub function: Arc<Function>,
    /// When it was uploaded (or first configured).
    pub created: SystemTime,
    /// Whether calls go to it.
    pub live: bool,
}

/// One function as listed.
#[derive(Clone)]
pub struct Summary {
    /// Its name.
    pub name: String,
    /// The version calls go to, if any.
    pub live: Option<Arc<Function>>,
    /// How many versions it has.
    pub versions: usize,
}

/// A version just loaded, and whether it is new.
pub struct Loaded {
    /// The version.
    pub function: Arc<Function>,
    /// False when the function already had this exact component as a
    /// version (nothing was compiled or added).
    pub created: bool,
}

/// A version whose code is loaded, ready to go live (see
/// [`Registry::ready`]).
pub struct Ready<'r> {
    registry: &'r Registry,
    /// `None` once live.
    function: Option<Arc<Function>>,
}

impl Ready<'_> {
    /// The version.
    pub fn function(&self) -> &Arc<Function> {
        self.function.as_ref().expect("taken only by go_live")
    }

    /// Make it live now: calls that start from now on run it.
    ///
    /// # Errors
    /// [`VersionError::UnknownVersion`] when it was deleted meanwhile.
    pub fn go_live(mut self) -> Result<Arc<Function>, VersionError> {
        let function = self.function.take().expect("taken only here");
        let made = self.registry.make_live(function.name(), &function);
        match made {
            Ok(()) => Ok(function),
            Err(e) => {
                self.function = Some(function);
                Err(e)
            }
        }
    }
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        if let Some(function) = self.function.take() {
            // Under the registry's lock, as a version goes live: it cannot
            // go live between the check and the retirement.
            let functions = self.registry.write();
            let live = functions
                .get(function.name())
                .and_then(|named| named.live.as_ref())
                .is_some_and(|live| Arc::ptr_eq(live, &function));
            if !live {
                function.retire();
            }
        }
    }
}

/// Why a version cannot be made ready to go live.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// An unknown function or version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// Its code can be neither loaded nor compiled.
    #[error("{0}")]
    Load(crate::InvokeError),
}

/// A change to a function's versions that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// No function has that name.
    #[error("no function {0:?}")]
    UnknownFunction(String),
    /// The function has no such version.
    #[error("function {function:?} has no version {version:?}")]
    UnknownVersion {
        /// The function.
        function: String,
        /// The version asked for.
        version: String,
    },
    /// The version is live: make another one live first.
    #[error(
        "version {version} of function {function:?} is live: make another version live first, \
         or delete the whole function"
    )]
    Live {
        /// The function.
        function: String,
        /// The live version.
        version: String,
    },
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

    /// Load `wasm` as a version of `name` and make it live, as
    /// [`Registry::load_version`] does.
    ///
    /// # Errors
    /// As [`Registry::load_version`].
    pub async fn load(&self, name: &str, wasm: Vec<u8>) -> Result<Arc<Function>, LoadError> {
        Ok(self
            .load_version(name, wasm.into(), true, SystemTime::now())
            .await?
            .function)
    }

    /// Load `wasm` as a version of function `name` (creating the function)
    /// and make it live if `live`. A component that already is a version
    /// of `name` is that version (`created` false; made live if `live`).
    ///
    /// # Errors
    /// As [`Registry::prepare`].
    pub async fn load_version(
        &self,
        name: &str,
        wasm: Bytes,
        live: bool,
        created: SystemTime,
    ) -> Result<Loaded, LoadError> {
        if let Some(existing) = self.find(name, &digest_hex(&wasm)) {
            if live {
                // Found just above; a concurrent delete makes this a no-op.
                let _ = self.set_live(name, existing.version()).await;
            }
            return Ok(Loaded {
                function: existing,
                created: false,
            });
        }
        let function = self.prepare(name, wasm, Keep::InMemory).await?;
        let created = self.insert(function.clone(), created, live);
        Ok(Loaded { function, created })
    }

    /// Compile `wasm` (on a blocking thread) into a version of function
    /// `name`, or load its artifact saved by an earlier run, without adding
    /// it: [`Registry::insert`] does, once the caller has recorded it. The
    /// component is kept as `keep` says.
    ///
    /// # Errors
    /// A [`LoadError`] naming the function when it is not a valid Tidegate
    /// component or its artifact cannot be written.
    pub async fn prepare(
        &self,
        name: &str,
        wasm: Bytes,
        keep: Keep,
    ) -> Result<Arc<Function>, LoadError> {
        self.build(name, wasm, keep, Readiness::Now).await
    }

    /// [`Registry::prepare`] without loading the code: the version is
    /// compiled (or loaded from its artifact) at its first call, or when
    /// [`Registry::load_live`] finds it live. For a node catching up with
    /// a log of changes every one of which another node already checked:
    /// only the versions that end up live are compiled.
    ///
    /// # Errors
    /// [`LoadError::Artifact`] when its artifact directory cannot be read.
    pub async fn prepare_unloaded(
        &self,
        name: &str,
        wasm: Bytes,
        keep: Keep,
    ) -> Result<Arc<Function>, LoadError> {
        self.build(name, wasm, keep, Readiness::OnFirstUse).await
    }

    /// Restore a version recorded by an earlier run: like
    /// [`Registry::load_version`], but a version that is not live is not
    /// loaded (nor compiled) before its first use. The component is kept
    /// as `keep` says.
    ///
    /// # Errors
    /// As [`Registry::prepare`].
    pub async fn restore_version(
        &self,
        name: &str,
        wasm: Bytes,
        keep: Keep,
        live: bool,
        created: SystemTime,
    ) -> Result<Arc<Function>, LoadError> {
        let readiness = if live {
            Readiness::Now
        } else {
            Readiness::OnFirstUse
        };
        let function = self.build(name, wasm, keep, readiness).await?;
        self.insert(function.clone(), created, live);
        Ok(function)
    }

    async fn build(
        &self,
        name: &str,
        wasm: Bytes,
        keep: Keep,
        readiness: Readiness,
    ) -> Result<Arc<Function>, LoadError> {
        let engine = self.engine.clone();
        let config = self.config.clone();
        let metrics = self.metrics.clone();
        let owned_name = name.to_owned();
        let function = tokio::task::spawn_blocking(move || {
            Function::open(engine, config, &metrics, &owned_name, wasm, keep, readiness)
        })
        .await
        .map_err(|e| LoadError::Engine(format!("compilation task failed: {e}")))??;
        Ok(Arc::new(function))
    }

    /// Add a prepared version to its function (creating the function), and
    /// make it live if `live`. Returns false (and changes nothing but which
    /// version is live) when the function already has that version.
    pub fn insert(&self, function: Arc<Function>, created: SystemTime, live: bool) -> bool {
        let name = function.name().to_owned();
        let mut functions = self.write();
        let named = functions.entry(name.clone()).or_insert_with(|| Named {
            live: None,
            versions: Vec::new(),
        });
        let existing = named
            .versions
            .iter()
            .find(|v| v.function.version() == function.version())
            .map(|v| v.function.clone());
        let (function, added) = match existing {
            Some(existing) => (existing, false),
            None => {
                named.versions.push(Version {
                    function: function.clone(),
                    created,
                    live: false,
                });
                (function, true)
            }
        };
        let retired = if live {
            swap_live(named, &function)
        } else if named
            .live
            .as_ref()
            .is_some_and(|live| Arc::ptr_eq(live, &function))
        {
            None
        } else {
            Some(function.clone())
        };
        drop(functions);
        if let Some(retired) = retired {
            retired.retire();
        }
        if added {
            tracing::info!(
                function = %name,
                version = function.version(),
                live,
                "function version added"
            );
        }
        added
    }

    /// Drop a version [`Registry::prepare`] made that was not inserted
    /// (the change it was for failed): its artifact and metric series go,
    /// unless the function has that version after all.
    pub fn discard(&self, function: &Arc<Function>) {
        if self.version(function.name(), function.version()).is_some() {
            return;
        }
        forget(function);
        if !self.read().contains_key(function.name()) {
            self.metrics.remove_function(function.name());
        }
    }

    /// Version `version` of `name`, or which of the two is unknown.
    fn existing(&self, name: &str, version: &str) -> Result<Arc<Function>, VersionError> {
        self.version(name, version).ok_or_else(|| {
            if self.read().contains_key(name) {
                VersionError::UnknownVersion {
                    function: name.to_owned(),
                    version: version.to_owned(),
                }
            } else {
                VersionError::UnknownFunction(name.to_owned())
            }
        })
    }

    /// The live version of a function: what a call should run now.
    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.read().get(name)?.live.clone()
    }

    /// The version `version` of function `name`, live or not.
    pub fn version(&self, name: &str, version: &str) -> Option<Arc<Function>> {
        self.read()
            .get(name)?
            .versions
            .iter()
            .find(|v| v.function.version() == version)
            .map(|v| v.function.clone())
    }

    /// Make version `version` of `name` live: calls that start from now on
    /// run it; calls running on the previous live version finish there,
    /// and that version's instances go as they end. Its code is loaded
    /// first, so the first call does not wait for it.
    ///
    /// # Errors
    /// [`VersionError::UnknownFunction`] or
    /// [`VersionError::UnknownVersion`].
    pub async fn set_live(&self, name: &str, version: &str) -> Result<Arc<Function>, VersionError> {
        let function = self.existing(name, version)?;
        function.revive();
        if let Err(e) = function.preload().await {
            // Its calls will say so too; making it live is what was asked.
            tracing::warn!(function = name, version, "loading the version's code: {e}");
        }
        // Found above; a concurrent delete makes this a no-op.
        let _ = self.make_live(name, &function);
        Ok(function)
    }

    /// Make version `version` of `name` live now, without loading its code
    /// first (see [`Registry::prepare_unloaded`]).
    ///
    /// # Errors
    /// [`VersionError::UnknownFunction`] or
    /// [`VersionError::UnknownVersion`].
    pub fn set_live_unloaded(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<Function>, VersionError> {
        let function = self.existing(name, version)?;
        function.revive();
        self.make_live(name, &function)?;
        Ok(function)
    }

    /// Load the code of every live version that does not have it loaded
    /// (from its artifact, or compiled), one after another; the versions
    /// that could not be loaded, with why.
    pub async fn load_live(&self) -> Vec<(Arc<Function>, InvokeError)> {
        let live: Vec<Arc<Function>> = self
            .read()
            .values()
            .filter_map(|named| named.live.clone())
            .filter(|function| !function.is_loaded())
            .collect();
        let mut failed = Vec::new();
        for function in live {
            if let Err(e) = function.preload().await {
                failed.push((function, e));
            }
        }
        failed
    }

    /// Make version `version` of `name` ready to go live: its code loaded
    /// (from its artifact, or compiled again) and kept, without making it
    /// live; [`Ready::go_live`] does, at once. For a caller that records
    /// the change in between and must not hold its own lock while code
    /// loads. A `Ready` dropped without going live leaves the version as
    /// it was (not live, its code let go).
    ///
    /// # Errors
    /// [`ReadyError::Version`] for an unknown function or version;
    /// [`ReadyError::Load`] when its code can be neither loaded nor
    /// compiled.
    pub async fn ready(&self, name: &str, version: &str) -> Result<Ready<'_>, ReadyError> {
        let function = self.existing(name, version)?;
        // Kept loaded while it waits to go live.
        function.revive();
        let ready = Ready {
            registry: self,
            function: Some(function),
        };
        ready.function().preload().await.map_err(ReadyError::Load)?;
        Ok(ready)
    }

    /// Make `function`, a version of `name`, live now (see
    /// [`Registry::set_live`]).
    ///
    /// # Errors
    /// [`VersionError::UnknownVersion`] when it is no longer a version of
    /// `name`.
    fn make_live(&self, name: &str, function: &Arc<Function>) -> Result<(), VersionError> {
        let retired = {
            let mut functions = self.write();
            let named = functions
                .get_mut(name)
                .filter(|named| {
                    named
                        .versions
                        .iter()
                        .any(|v| Arc::ptr_eq(&v.function, function))
                })
                .ok_or_else(|| VersionError::UnknownVersion {
                    function: name.to_owned(),
                    version: function.version().to_owned(),
                })?;
            swap_live(named, function)
        };
        if let Some(retired) = retired {
            retired.retire();
            tracing::info!(
                function = name,
                version = function.version(),
                previous = retired.version(),
                "live version changed"
            );
        }
        Ok(())
    }

    /// Delete version `version` of `name`, which must not be live; its
    /// artifact and metric series go with it.
    ///
    /// # Errors
    /// [`VersionError::Live`] when it is the live version; unknown
    /// function or version.
    pub fn remove_version(&self, name: &str, version: &str) -> Result<(), VersionError> {
        let removed = {
            let mut functions = self.write();
            let named = functions
                .get_mut(name)
                .ok_or_else(|| VersionError::UnknownFunction(name.to_owned()))?;
            let index = named
                .versions
                .iter()
                .position(|v| v.function.version() == version)
                .ok_or_else(|| VersionError::UnknownVersion {
                    function: name.to_owned(),
                    version: version.to_owned(),
                })?;
            if named.versions[index].live {
                return Err(VersionError::Live {
                    function: name.to_owned(),
                    version: version.to_owned(),
                });
            }
            named.versions.remove(index).function
        };
        forget(&removed);
        tracing::info!(function = name, version, "function version deleted");
        Ok(())
    }

    /// Delete function `name` and every version of it. Calls running
    /// finish; no new call finds it.
    ///
    /// # Errors
    /// [`VersionError::UnknownFunction`].
    pub fn remove(&self, name: &str) -> Result<(), VersionError> {
        let named = self
            .write()
            .remove(name)
            .ok_or_else(|| VersionError::UnknownFunction(name.to_owned()))?;
        for version in &named.versions {
            forget(&version.function);
        }
        self.metrics.remove_function(name);
        tracing::info!(function = name, "function deleted");
        Ok(())
    }

    /// Every version of `name`, oldest first.
    pub fn versions(&self, name: &str) -> Option<Vec<Version>> {
        Some(self.read().get(name)?.versions.clone())
    }

    /// Every function, by name.
    pub fn list(&self) -> Vec<Summary> {
        let mut list: Vec<Summary> = self
            .read()
            .iter()
            .map(|(name, named)| Summary {
                name: name.clone(),
                live: named.live.clone(),
                versions: named.versions.len(),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Every version of every function, in no particular order.
    pub fn all(&self) -> Vec<Arc<Function>> {
        self.read()
            .values()
            .flat_map(|named| named.versions.iter().map(|v| v.function.clone()))
            .collect()
    }

    /// The version of `name` whose component has this SHA-256 (hex).
    fn find(&self, name: &str, digest: &str) -> Option<Arc<Function>> {
        self.read()
            .get(name)?
            .versions
            .iter()
            .find(|v| v.function.digest() == digest)
            .map(|v| v.function.clone())
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Named>> {
        self.functions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Named>> {
        self.functions
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Make `function` (a version of `named`) live; the version it replaces,
/// to be retired outside the lock.
fn swap_live(named: &mut Named, function: &Arc<Function>) -> Option<Arc<Function>> {
    for version in &mut named.versions {
        version.live = Arc::ptr_eq(&version.function, function);
    }
    function.revive();
    match named.live.replace(function.clone()) {
        Some(previous) if !Arc::ptr_eq(&previous, function) => Some(previous),
        _ => None,
    }
}

/// A deleted version: no instances kept, no artifact, no metric series.
fn forget(function: &Function) {
    function.retire();
    function.forget_metrics();
    function.remove_artifact();
}

/// The SHA-256 of a component, in hexadecimal, as [`Function::digest`].
pub fn digest_hex(wasm: &[u8]) -> String {
    artifact::hex(&Sha256::digest(wasm))
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn registry() -> (Registry, prometheus::Registry, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = RuntimeConfig {
            artifact_dir: dir.path().join("artifacts"),
            max_total_instances: NonZeroU32::new(8).unwrap(),
            ..RuntimeConfig::default()
        };
        let prometheus = prometheus::Registry::new();
        let metrics = RuntimeMetrics::register(&prometheus).expect("metrics");
        (
            Registry::new(config, metrics).expect("engine"),
            prometheus,
            dir,
        )
    }

    /// A second, distinct handler component: the echo component with a
    /// custom section appended (another digest, the same code).
    fn echo_variant(tag: &str) -> Bytes {
        let mut wasm = tidegate_functions::ECHO.to_vec();
        let name = b"tidegate-test";
        let payload = tag.as_bytes();
        let mut section = vec![name.len() as u8];
        section.extend_from_slice(name);
        section.extend_from_slice(payload);
        wasm.push(0); // custom section id
        wasm.push(section.len() as u8);
        wasm.extend_from_slice(&section);
        wasm.into()
    }

    fn versions(prometheus: &prometheus::Registry, family: &str) -> Vec<String> {
        let mut found: Vec<String> = prometheus
            .gather()
            .iter()
            .filter(|f| f.name() == family)
            .flat_map(|f| f.get_metric().iter())
            .flat_map(|m| m.get_label().iter())
            .filter(|l| l.name() == "version")
            .map(|l| l.value().to_owned())
            .collect();
        found.sort();
        found
    }

    #[tokio::test]
    async fn versions_are_added_once_and_the_live_one_is_what_get_returns() {
        let (registry, _prometheus, _dir) = registry();
        let now = SystemTime::now();
        let first = registry
            .load_version("f", echo_variant("1"), true, now)
            .await
            .unwrap();
        assert!(first.created);
        let again = registry
            .load_version("f", echo_variant("1"), true, now)
            .await
            .unwrap();
        assert!(!again.created, "the same digest is the same version");
        assert!(Arc::ptr_eq(&first.function, &again.function));
        let second = registry
            .load_version("f", echo_variant("2"), false, now)
            .await
            .unwrap();
        assert!(second.created);
        assert_ne!(first.function.version(), second.function.version());
        assert_eq!(second.function.digest().len(), 64);
        assert!(
            second
                .function
                .digest()
                .starts_with(second.function.version())
        );
        let live = registry.get("f").unwrap();
        assert_eq!(live.version(), first.function.version(), "live=false");
        assert!(
            !second.function.is_loaded(),
            "a version not live holds no code"
        );

        registry
            .set_live("f", second.function.version())
            .await
            .unwrap();
        assert_eq!(
            registry.get("f").unwrap().version(),
            second.function.version()
        );
        let listed = registry.versions("f").unwrap();
        assert_eq!(
            listed.iter().map(|v| v.live).collect::<Vec<_>>(),
            vec![false, true]
        );
        assert_eq!(registry.list()[0].versions, 2);
        assert!(matches!(
            registry.set_live("f", "0000000000000000").await,
            Err(VersionError::UnknownVersion { .. })
        ));
        assert!(matches!(
            registry.set_live("g", "0000000000000000").await,
            Err(VersionError::UnknownFunction(_))
        ));
    }

    #[tokio::test]
    async fn a_version_no_longer_live_loses_its_instances_once_its_calls_end() {
        let (registry, prometheus, _dir) = registry();
        let old = registry
            .load("f", echo_variant("old").to_vec())
            .await
            .unwrap();
        let ctx = Arc::new(crate::Context {
            id: "c".into(),
            route: "/".into(),
            claims: vec![],
            state: None,
        });
        let call = |f: Arc<Function>| {
            let ctx = ctx.clone();
            async move {
                f.on_message(
                    ctx,
                    crate::Payload::Text("x".into()),
                    crate::Priority::Normal,
                )
                .await
                .unwrap()
                .unwrap()
            }
        };
        call(old.clone()).await;
        assert_eq!(old.live_instances(), 1, "kept idle while live");
        let new = registry
            .load("f", echo_variant("new").to_vec())
            .await
            .unwrap();
        assert_eq!(old.live_instances(), 0, "idle instances go at once");
        assert!(!old.is_loaded(), "and the code with them");
        // A call that had already looked up the old version still runs
        // on it, and leaves nothing behind.
        call(old.clone()).await;
        assert_eq!(old.live_instances(), 0);
        assert!(!old.is_loaded());
        assert_eq!(old.invocations(), 2);
        call(registry.get("f").unwrap()).await;
        assert_eq!(new.live_instances(), 1);

        // Rolling back brings the old version's code back first.
        registry.set_live("f", old.version()).await.unwrap();
        assert!(old.is_loaded());
        assert_eq!(new.live_instances(), 0);

        assert_eq!(
            registry.remove_version("f", old.version()),
            Err(VersionError::Live {
                function: "f".into(),
                version: old.version().into()
            })
        );
        registry.remove_version("f", new.version()).unwrap();
        assert_eq!(
            versions(&prometheus, "tidegate_function_instances"),
            vec![old.version().to_owned()]
        );
        // A call that still held the deleted version brings none of its
        // series back.
        new.on_disconnect(ctx.clone(), 1000, String::new())
            .await
            .unwrap();
        assert!(
            !versions(&prometheus, "tidegate_invocations_total")
                .contains(&new.version().to_owned()),
            "a deleted version's series came back"
        );
        registry.remove("f").unwrap();
        assert!(registry.get("f").is_none());
        assert!(versions(&prometheus, "tidegate_function_instances").is_empty());
        assert!(versions(&prometheus, "tidegate_invocations_total").is_empty());
        assert_eq!(
            registry.remove("f"),
            Err(VersionError::UnknownFunction("f".into()))
        );
    }

    /// Compiles and loads from artifacts when a fresh registry on
    /// `artifact_dir` restores `wasm` as function `f`.
    struct Restored {
        compiles: u64,
        code_loads: u64,
        loaded: bool,
    }

    async fn restore(artifact_dir: &std::path::Path, wasm: &Bytes, live: bool) -> Restored {
        let prometheus = prometheus::Registry::new();
        let metrics = RuntimeMetrics::register(&prometheus).expect("metrics");
        let config = RuntimeConfig {
            artifact_dir: artifact_dir.to_path_buf(),
            max_total_instances: NonZeroU32::new(8).unwrap(),
            ..RuntimeConfig::default()
        };
        let registry = Registry::new(config, metrics).expect("engine");
        let f = registry
            .restore_version("f", wasm.clone(), Keep::InMemory, live, SystemTime::now())
            .await
            .unwrap();
        assert_eq!(registry.get("f").is_some(), live);
        let count = |family: &str| -> u64 {
            prometheus
                .gather()
                .iter()
                .filter(|f| f.name() == family)
                .flat_map(|f| f.get_metric().iter())
                .map(|m| m.get_counter().get_value() as u64)
                .sum()
        };
        Restored {
            compiles: count("tidegate_function_compiles_total"),
            code_loads: count("tidegate_function_code_loads_total"),
            loaded: f.is_loaded(),
        }
    }

    #[tokio::test]
    async fn a_restored_version_reuses_its_artifact_unless_the_engine_or_the_file_changed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let artifacts = dir.path().join("artifacts");
        let wasm = echo_variant("persisted");
        assert_eq!(restore(&artifacts, &wasm, true).await.compiles, 1);

        // A restart: the sealed artifact is loaded, nothing is compiled.
        let again = restore(&artifacts, &wasm, true).await;
        assert_eq!(
            (again.compiles, again.code_loads, again.loaded),
            (0, 1, true)
        );

        // A damaged artifact is compiled again.
        let artifact = artifact::path_in(&artifacts, "f", &digest_hex(&wasm)[..16]);
        let mut bytes = std::fs::read(&artifact).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&artifact, &bytes).unwrap();
        assert_eq!(restore(&artifacts, &wasm, true).await.compiles, 1);

        // An artifact of another engine (another wasmtime build or
        // compiler settings) is compiled again.
        let seal = artifact.with_extension("seal");
        let text = std::fs::read_to_string(&seal).unwrap();
        let engine_line = text.lines().nth(1).unwrap().to_owned();
        assert!(engine_line.starts_with("engine "), "{text}");
        std::fs::write(&seal, text.replace(&engine_line, "engine 0123456789abcdef")).unwrap();
        assert_eq!(restore(&artifacts, &wasm, true).await.compiles, 1);

        // A version that is not live is neither loaded nor compiled.
        let other = restore(&artifacts, &echo_variant("other"), false).await;
        assert_eq!(
            (other.compiles, other.code_loads, other.loaded),
            (0, 0, false)
        );
    }

    #[tokio::test]
    async fn a_version_kept_in_a_file_compiles_from_it_and_not_from_a_replaced_one() {
        let (registry, _prometheus, dir) = registry();
        let message = |f: Arc<Function>| async move {
            let ctx = Arc::new(crate::Context {
                id: "c".into(),
                route: "/".into(),
                claims: vec![],
                state: None,
            });
            f.on_message(
                ctx,
                crate::Payload::Text("x".into()),
                crate::Priority::Normal,
            )
            .await
        };
        let restore = |name: &'static str, wasm: Bytes| {
            let file = dir.path().join(format!("{name}.wasm"));
            std::fs::write(&file, &wasm).unwrap();
            let registry = &registry;
            async move {
                let f = registry
                    .restore_version(
                        name,
                        wasm,
                        Keep::File(file.clone()),
                        false,
                        SystemTime::now(),
                    )
                    .await
                    .unwrap();
                (f, file)
            }
        };
        // Not live: nothing compiled until the first call, which compiles
        // from the file.
        let (kept, _) = restore("kept", echo_variant("kept")).await;
        assert!(!kept.is_loaded());
        message(kept.clone()).await.unwrap().unwrap();
        assert_eq!(kept.size(), echo_variant("kept").len());

        let (replaced, file) = restore("replaced", echo_variant("replaced")).await;
        std::fs::write(&file, echo_variant("other")).unwrap();
        let error = message(replaced).await.unwrap_err();
        assert!(
            error.to_string().contains("damaged or was replaced"),
            "{error}"
        );

        // A link in its place is not followed, even to the right bytes.
        let (linked, file) = restore("linked", echo_variant("linked")).await;
        let elsewhere = dir.path().join("elsewhere.wasm");
        std::fs::write(&elsewhere, echo_variant("linked")).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
        let error = message(linked).await.unwrap_err();
        assert!(error.to_string().contains("cannot be read"), "{error}");
    }

    #[tokio::test]
    async fn something_that_is_not_a_handler_component_is_refused() {
        let (registry, _prometheus, _dir) = registry();
        // Not wasm; a core module; a component that exports no handler.
        for bad in [&b"not wasm"[..], b"\0asm\x01\0\0\0", b"\0asm\x0d\0\x01\0"] {
            let error = registry
                .load_version("f", Bytes::copy_from_slice(bad), true, SystemTime::now())
                .await
                .err()
                .expect("refused");
            assert!(matches!(error, LoadError::Invalid { .. }), "{error}");
        }
        assert!(registry.list().is_empty());
    }
}
