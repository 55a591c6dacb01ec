//! The catalog: the functions, versions and routes the management API
//! changes, kept on disk under `server.state_dir` and back after a
//! restart.
//!
//! A change is checked first, then written to disk, then made in the
//! registry and the route table, one change at a time (one lock): a change
//! refused or failing to persist leaves everything as it was. Functions and
//! routes of the config file are the file's: the API lists them but does
//! not change them.
//!
//! - [`disk`]: the files (components by digest, the index), written
//!   atomically.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use runtime::registry::{self, ReadyError, VersionError};
use runtime::{Function, Keep, LoadError, Registry};
use tokio::sync::{Mutex, Semaphore, SemaphorePermit};

use crate::router::{Origin, Route, RouteError, RouteSpec, RouteTable, TableError};

mod change;
pub mod disk;

pub use change::{Applied, Change, ChangeLog};

use disk::{Disk, DiskError, FunctionRecord, Index, VersionRecord};

/// Longest an upload waits for the one compilation slot before it is
/// refused as busy.
pub const UPLOAD_WAIT: Duration = Duration::from_secs(60);

/// The functions and routes the management API changes.
pub struct Catalog {
    /// Where uploads and API routes are kept.
    disk: Disk,
    /// The index as on disk. Held across a whole change, so changes happen
    /// one at a time and each is checked against what it changes.
    index: Mutex<Index>,
    /// The functions, their versions and the live ones.
    registry: Arc<Registry>,
    /// The routes.
    routes: Arc<RouteTable>,
    /// The config file's functions: not changed through the API.
    config_functions: BTreeSet<String>,
    /// Largest component accepted, and most versions kept.
    limits: Limits,
    /// One upload read and compiled at a time: a component can take
    /// seconds of all cores and hundreds of megabytes to compile, so
    /// parallel uploads would only compete, and could exhaust memory.
    uploads: Semaphore,
    /// The cluster's log of changes, when this node is part of one.
    log: std::sync::OnceLock<Arc<dyn ChangeLog>>,
    /// One compilation at a time, an upload's or a switch's to a version
    /// whose code must be loaded again; held only while compiling, so a
    /// rollback does not wait for an upload's body to arrive.
    compiles: Semaphore,
    /// Catching up with the cluster's log from its start: versions are
    /// recorded without compiling them, and only the live ones are
    /// compiled at the end ([`Catalog::catch_up`], [`Catalog::caught_up`]).
    deferring: std::sync::atomic::AtomicBool,
}

/// The catalog's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest component accepted, in bytes (`admin.max_upload_size`).
    pub max_upload_size: usize,
    /// Most versions a function keeps (`admin.max_versions`): an upload
    /// beyond deletes the oldest ones, never the live one nor itself.
    pub max_versions: NonZeroUsize,
}

/// A function or route change that was refused, or failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The name is not a function name.
    #[error(
        "{0:?} is not a function name: lower-case letters, digits and '-', starting with a \
         letter or digit, at most 63 characters"
    )]
    BadName(String),
    /// The function is the config file's.
    #[error(
        "function {0:?} is defined in the config file: change it there (the API cannot change or \
         delete it, nor upload under its name)"
    )]
    ConfigFunction(String),
    /// A version change that does not fit (unknown, live).
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The function is still named by routes.
    #[error("function {function:?} is used by the routes {}: change or delete them first", .paths.join(", "))]
    InUse {
        /// The function.
        function: String,
        /// The paths of the routes that name it.
        paths: Vec<String>,
    },
    /// The component is too large.
    #[error("the component is larger than admin.max_upload_size ({limit} bytes)")]
    TooLarge {
        /// `admin.max_upload_size`.
        limit: usize,
    },
    /// Another upload kept the compilation slot for too long.
    #[error(
        "another upload is being compiled and did not finish within {}s: try again later",
        UPLOAD_WAIT.as_secs()
    )]
    Busy,
    /// The body is not a Tidegate handler component.
    #[error("{0}")]
    Invalid(LoadError),
    /// Another component of the function has the same version (the first
    /// 16 hex digits of their SHA-256 are equal).
    #[error(
        "function {function:?} already has a version {version} of another component (their \
         SHA-256 differ beyond the 16 digits of a version): upload it under another name"
    )]
    VersionClash {
        /// The function.
        function: String,
        /// The version both would be.
        version: String,
    },
    /// The version's code can be neither loaded nor compiled.
    #[error(
        "version {version} of function {function:?} cannot be loaded, nothing was changed: {reason}"
    )]
    Unloadable {
        /// The function.
        function: String,
        /// The version.
        version: String,
        /// Why.
        reason: String,
    },
    /// The route spec is not valid.
    #[error("route {0}")]
    BadRoute(RouteError),
    /// The route names a function that is not there.
    #[error(
        "route {path}: function {function:?} does not exist or has no live version: upload it first"
    )]
    MissingFunction {
        /// The route's path.
        path: String,
        /// The function it names.
        function: String,
    },
    /// The route is the config file's, or there is none at that path.
    #[error(transparent)]
    Route(#[from] TableError),
    /// The change could not be kept on disk; nothing was changed.
    #[error("{0}")]
    Disk(#[from] DiskError),
    /// The function could not be loaded (its artifact cannot be written).
    #[error("{0}")]
    Load(LoadError),
    /// The change could not be shared with the cluster (or not applied
    /// here in time).
    #[error("the cluster's registry: {0}")]
    Unshared(String),
}

/// A version after an upload.
pub struct Uploaded {
    /// The version.
    pub function: Arc<Function>,
    /// Whether it is new (else that exact component already was one).
    pub created: bool,
    /// When it was first uploaded.
    pub created_at: SystemTime,
    /// The oldest versions deleted to keep `admin.max_versions`.
    pub pruned: Vec<String>,
}

/// What start-up restored from disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Functions uploaded.
    pub functions: usize,
    /// Their versions.
    pub versions: usize,
    /// Routes added through the API.
    pub routes: usize,
}

/// Why the catalog cannot be restored at start-up. Each names the file or
/// the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A file cannot be read, or is damaged.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A function uploaded earlier cannot be loaded.
    #[error("{}: {source}", .index.display())]
    Load {
        /// The index naming it.
        index: std::path::PathBuf,
        /// Why.
        source: LoadError,
    },
    /// The config file and the uploads both define something.
    #[error(
        "{what} is defined in the config file and was also added through the API ({}): \
         remove it from the config file, or delete it through the API without it in the file",
        .index.display()
    )]
    Conflict {
        /// What both define.
        what: String,
        /// The index.
        index: std::path::PathBuf,
    },
    /// A route of the index is not valid, or names a function not there.
    #[error("{}: route {path}: {reason}", .index.display())]
    Route {
        /// The index.
        index: std::path::PathBuf,
        /// The route's path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl Catalog {
    /// Open the catalog under `state_dir` and restore what it holds into
    /// `registry` and `routes`, which already hold the config file's
    /// functions (`config_functions`) and routes. Versions that are not
    /// live are not loaded before their first use; live ones are loaded
    /// from their precompiled artifact when it is still good.
    ///
    /// Anything damaged stops start-up with an error naming the file:
    /// serving without some uploaded functions would answer clients with
    /// 404s or an old version, and the next change would write the loss
    /// to disk.
    ///
    /// # Errors
    /// A [`RestoreError`] naming the file or setting at fault.
    pub async fn open(
        state_dir: &Path,
        registry: Arc<Registry>,
        routes: Arc<RouteTable>,
        config_functions: BTreeSet<String>,
        limits: Limits,
    ) -> Result<(Self, Restored), RestoreError> {
        let disk = Disk::open(state_dir)?;
        let mut index = disk.read_index()?;
        // A function whose last version was deleted by an earlier build:
        // there is nothing to serve (written away with the next change).
        index
            .functions
            .retain(|_, function| !function.versions.is_empty());
        let index_path = disk.index_path();
        let mut restored = Restored::default();
        for (name, function) in &index.functions {
            if config_functions.contains(name) {
                return Err(RestoreError::Conflict {
                    what: format!("function {name:?}"),
                    index: index_path,
                });
            }
            for version in &function.versions {
                let wasm = disk.read_component(name, version)?;
                let created =
                    humantime::parse_rfc3339(&version.created).map_err(|e| DiskError::Corrupt {
                        path: index_path.clone(),
                        reason: format!(
                            "function {name:?} version {}: created {:?}: {e}",
                            version.version(),
                            version.created
                        ),
                    })?;
                let live = function.live.as_deref() == Some(version.version());
                let keep = Keep::File(disk.component_path(&version.digest));
                // Stopped while catching up with the cluster: what was live
                // then is part of the history, compiled only if it is still
                // live at its end.
                let load_now = live && !index.catching_up;
                registry
                    .restore_version(name, wasm, keep, load_now, created)
                    .await
                    .map_err(|source| RestoreError::Load {
                        index: index_path.clone(),
                        source,
                    })?;
                if live && !load_now {
                    registry
                        .set_live_unloaded(name, version.version())
                        .map_err(|e| DiskError::Corrupt {
                            path: index_path.clone(),
                            reason: e.to_string(),
                        })?;
                }
                restored.versions += 1;
            }
            restored.functions += 1;
        }
        for spec in &index.routes {
            let path = spec.path.clone();
            let route_error = |reason: String| RestoreError::Route {
                index: index_path.clone(),
                path: path.clone(),
                reason,
            };
            let route = Route::new(spec.clone()).map_err(|e| route_error(e.to_string()))?;
            if let Some(missing) = route
                .functions()
                .into_iter()
                .find(|f| registry.get(f).is_none())
            {
                return Err(route_error(format!(
                    "function {missing:?} does not exist or has no live version"
                )));
            }
            routes.put(route).map_err(|_| RestoreError::Conflict {
                what: format!("route {path}"),
                index: index_path.clone(),
            })?;
            restored.routes += 1;
        }
        disk.remove_unused(&index);
        let catalog = Self {
            disk,
            index: Mutex::new(index),
            registry,
            routes,
            config_functions,
            limits,
            uploads: Semaphore::new(1),
            compiles: Semaphore::new(1),
            log: std::sync::OnceLock::new(),
            deferring: std::sync::atomic::AtomicBool::new(false),
        };
        Ok((catalog, restored))
    }

    /// Largest component accepted, in bytes.
    pub fn max_upload_size(&self) -> usize {
        self.limits.max_upload_size
    }

    /// Whether function `name` is the config file's.
    pub fn is_config_function(&self, name: &str) -> bool {
        self.config_functions.contains(name)
    }

    /// Check that a component may be uploaded as `name`, before its body is
    /// read.
    ///
    /// # Errors
    /// [`CatalogError::BadName`], [`CatalogError::ConfigFunction`].
    pub fn check_upload(&self, name: &str) -> Result<(), CatalogError> {
        if !crate::router::is_function_name(name) {
            return Err(CatalogError::BadName(name.to_owned()));
        }
        if self.is_config_function(name) {
            return Err(CatalogError::ConfigFunction(name.to_owned()));
        }
        Ok(())
    }

    /// The one upload slot, waited for up to [`UPLOAD_WAIT`]. Taken
    /// before the body is read, so waiting uploads hold no memory.
    ///
    /// # Errors
    /// [`CatalogError::Busy`] after [`UPLOAD_WAIT`].
    pub async fn upload_slot(&self) -> Result<SemaphorePermit<'_>, CatalogError> {
        wait_for(&self.uploads).await
    }

    /// The one compilation slot, waited for up to [`UPLOAD_WAIT`].
    async fn compile_slot(&self) -> Result<SemaphorePermit<'_>, CatalogError> {
        wait_for(&self.compiles).await
    }

    /// Add `wasm` as a version of function `name` (creating the function),
    /// live at once if `live`. The same component again is the same
    /// version (`created` false), made live if `live`. Call with the
    /// [`Catalog::upload_slot`] held.
    ///
    /// # Errors
    /// [`CatalogError::Invalid`] when it is not a Tidegate handler
    /// component; those of [`Catalog::check_upload`]; [`CatalogError::Disk`]
    /// when it cannot be kept.
    pub async fn upload(
        &self,
        name: &str,
        wasm: Bytes,
        live: bool,
    ) -> Result<Uploaded, CatalogError> {
        let Some(log) = self.log.get() else {
            return self.upload_here(name, wasm, live).await;
        };
        self.check_upload(name)?;
        if wasm.len() > self.limits.max_upload_size {
            return Err(CatalogError::TooLarge {
                limit: self.limits.max_upload_size,
            });
        }
        // Checked (and compiled) here before it goes in the log, where
        // every node would refuse it: its artifact is then reused.
        let digest = registry::digest_hex(&wasm);
        let checked = if self
            .registry
            .versions(name)
            .is_none_or(|versions| versions.iter().all(|v| v.function.digest() != digest))
        {
            Some(self.compile(name, &wasm, &digest).await?)
        } else {
            None
        };
        let change = Change::Upload {
            name: name.to_owned(),
            live,
            wasm,
        };
        match log.submit(change).await {
            Ok(Applied::Uploaded(uploaded)) => Ok(uploaded),
            Ok(_) => unreachable!("an upload is applied as one"),
            Err(error) => {
                // Its artifact and series go, unless it is a version now.
                if let Some(checked) = checked {
                    self.registry.discard(&checked);
                }
                Err(error)
            }
        }
    }

    /// Compile `wasm` (of SHA-256 `digest`) as a version of `name`, in the
    /// compile slot, without adding it; its component is to be kept in the
    /// catalog's file for that digest.
    async fn compile(
        &self,
        name: &str,
        wasm: &Bytes,
        digest: &str,
    ) -> Result<Arc<Function>, CatalogError> {
        let _compiling = self.compile_slot().await?;
        self.registry
            .prepare(name, wasm.clone(), self.keep(digest))
            .await
            .map_err(|e| match e {
                LoadError::Invalid { .. } => CatalogError::Invalid(e),
                other => CatalogError::Load(other),
            })
    }

    /// Where the component of SHA-256 `digest` is kept.
    fn keep(&self, digest: &str) -> Keep {
        Keep::File(self.disk.component_path(digest))
    }

    /// Carry out `change` on this node (for the cluster's log, which calls
    /// it on every node in the same order).
    ///
    /// # Errors
    /// Those of the change's own method.
    pub async fn apply(&self, change: Change) -> Result<Applied, CatalogError> {
        Ok(match change {
            Change::Upload { name, live, wasm } => {
                Applied::Uploaded(self.upload_here(&name, wasm, live).await?)
            }
            Change::SetLive { name, version } => Applied::Live(self.switch(&name, &version).await?),
            Change::RemoveVersion { name, version } => {
                self.remove_version_here(&name, &version).await?;
                Applied::Done
            }
            Change::RemoveFunction { name } => {
                self.remove_function_here(&name).await?;
                Applied::Done
            }
            Change::PutRoute { spec } => Applied::Route(self.put_route_here(spec).await?),
            Change::RemoveRoute { path } => {
                self.remove_route_here(&path).await?;
                Applied::Done
            }
        })
    }

    /// Make `change`: through the cluster's log when there is one (every
    /// node applies it), else here.
    async fn change(&self, change: Change) -> Result<Applied, CatalogError> {
        match self.log.get() {
            Some(log) => log.submit(change).await,
            None => self.apply(change).await,
        }
    }

    /// Share every later change through `log` (the cluster's).
    pub fn share_through(&self, log: Arc<dyn ChangeLog>) {
        let _ = self.log.set(log);
    }

    /// This node reads the cluster's log from its start: until
    /// [`Catalog::caught_up`], an uploaded version is recorded without its
    /// code being compiled (every node that took it from an API checked
    /// it), and a switch makes a version live without loading it, so that
    /// a node catching up with a long history compiles only what is live
    /// at its end, not every version ever uploaded.
    /// The index says so until [`Catalog::caught_up`], so that a node
    /// restarted in the middle catches up again before it is ready.
    ///
    /// # Errors
    /// [`CatalogError::Disk`] when the index cannot be written.
    pub async fn catch_up(&self) -> Result<(), CatalogError> {
        self.deferring
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.mark_catching_up(true).await
    }

    /// Whether this node has not yet read the cluster's log to its end
    /// once (it started on an empty state directory, or was stopped before
    /// it got there).
    pub async fn catching_up(&self) -> bool {
        let index = self.index.lock().await;
        index.log_offset.is_none() || index.catching_up
    }

    async fn mark_catching_up(&self, catching_up: bool) -> Result<(), CatalogError> {
        let mut index = self.index.lock().await;
        if index.catching_up == catching_up {
            return Ok(());
        }
        let mut next = index.clone();
        next.catching_up = catching_up;
        self.disk.write_index(&next)?;
        *index = next;
        Ok(())
    }

    /// The node read the cluster's log to its end: compile the live
    /// versions (in the compile slot) and go back to compiling each change
    /// as it comes. A version that cannot be loaded is logged; its calls
    /// fail and say so.
    pub async fn caught_up(&self) {
        if !self
            .deferring
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Err(e) = self.mark_catching_up(false).await {
            // The next start reads to the end again before it is ready.
            tracing::warn!("noting that the cluster's registry is read to its end: {e}");
        }
        let Ok(_compiling) = self.compile_slot().await else {
            // Busy for long: the live versions load at their first call.
            return;
        };
        for (function, error) in self.registry.load_live().await {
            tracing::error!(
                function = function.name(),
                version = function.version(),
                "the live version's code cannot be loaded: {error}"
            );
        }
    }

    fn deferring(&self) -> bool {
        self.deferring.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The position in the cluster's log of the last change applied here.
    pub async fn log_offset(&self) -> Option<u64> {
        self.index.lock().await.log_offset
    }

    /// Note that the change at `offset` of the cluster's log is applied.
    ///
    /// # Errors
    /// [`CatalogError::Disk`].
    pub async fn set_log_offset(&self, offset: u64) -> Result<(), CatalogError> {
        let mut index = self.index.lock().await;
        let mut next = index.clone();
        next.log_offset = Some(offset);
        self.disk.write_index(&next)?;
        *index = next;
        Ok(())
    }

    async fn upload_here(
        &self,
        name: &str,
        wasm: Bytes,
        live: bool,
    ) -> Result<Uploaded, CatalogError> {
        self.check_upload(name)?;
        if wasm.len() > self.limits.max_upload_size {
            return Err(CatalogError::TooLarge {
                limit: self.limits.max_upload_size,
            });
        }
        let digest = registry::digest_hex(&wasm);
        if let Some(uploaded) = self.reupload(name, &digest, live).await? {
            return Ok(uploaded);
        }
        check_clash(
            name,
            &digest,
            self.registry
                .versions(name)
                .unwrap_or_default()
                .iter()
                .map(|v| v.function.digest()),
        )?;
        // Compiled (and checked) before anything changes, outside the lock:
        // other changes go on meanwhile. The component is kept on disk,
        // not in memory: it is read back only to compile it again.
        let function = if self.deferring() {
            self.registry
                .prepare_unloaded(name, wasm.clone(), self.keep(&digest))
                .await
                .map_err(CatalogError::Load)?
        } else {
            self.compile(name, &wasm, &digest).await?
        };
        // Written under the index lock: a removal (which sweeps files the
        // index does not name) cannot run between the write and the index
        // naming the file.
        let mut index = self.index.lock().await;
        let recorded = self.record(&mut index, name, digest, &wasm, &function, live);
        if recorded.is_err() {
            // A component written for a change that failed goes too.
            self.disk.remove_unused(&index);
            self.registry.discard(&function);
        }
        recorded
    }

    /// Keep a prepared version on disk, then add it to the registry; with
    /// the index lock held.
    fn record(
        &self,
        index: &mut Index,
        name: &str,
        digest: String,
        wasm: &Bytes,
        function: &Arc<Function>,
        live: bool,
    ) -> Result<Uploaded, CatalogError> {
        let mut next = index.clone();
        let record = next.functions.entry(name.to_owned()).or_default();
        if let Some(existing) = record.versions.iter().find(|v| v.digest == digest) {
            // Uploaded meanwhile, by a caller without the upload slot.
            let created_at = parse_created(&existing.created);
            let function = self
                .registry
                .version(name, function.version())
                .unwrap_or_else(|| function.clone());
            return Ok(Uploaded {
                function,
                created: false,
                created_at,
                pruned: Vec::new(),
            });
        }
        check_clash(
            name,
            &digest,
            record.versions.iter().map(|v| v.digest.clone()),
        )?;
        self.disk.write_component(&digest, wasm)?;
        let created_at = SystemTime::now();
        // Kept through pruning too: the version to roll back to.
        let was_live = record.live.clone();
        record.versions.push(VersionRecord {
            digest,
            size: wasm.len() as u64,
            created: humantime::format_rfc3339_seconds(created_at).to_string(),
        });
        if live {
            record.live = Some(function.version().to_owned());
        }
        let keep = [Some(function.version()), was_live.as_deref()];
        let pruned = prune(record, &keep, self.limits.max_versions);
        self.disk.write_index(&next)?;
        *index = next;
        self.registry.insert(function.clone(), created_at, live);
        for version in &pruned {
            // In the registry: the index named it, under this lock.
            let _ = self.registry.remove_version(name, version);
        }
        if !pruned.is_empty() {
            tracing::info!(
                function = name,
                pruned = ?pruned,
                "oldest versions deleted to keep admin.max_versions"
            );
            self.disk.remove_unused(index);
        }
        Ok(Uploaded {
            function: function.clone(),
            created: true,
            created_at,
            pruned,
        })
    }

    /// An upload of a component that already is a version of `name`: made
    /// live if `live`; `None` if it is not a version.
    async fn reupload(
        &self,
        name: &str,
        digest: &str,
        live: bool,
    ) -> Result<Option<Uploaded>, CatalogError> {
        let Some(existing) = self
            .registry
            .versions(name)
            .and_then(|versions| versions.into_iter().find(|v| v.function.digest() == digest))
        else {
            return Ok(None);
        };
        if live && !existing.live {
            self.switch(name, existing.function.version()).await?;
        }
        Ok(Some(Uploaded {
            function: existing.function,
            created: false,
            created_at: existing.created,
            pruned: Vec::new(),
        }))
    }

    /// Make version `version` of `name` live (a rollback or a roll
    /// forward).
    ///
    /// # Errors
    /// [`CatalogError::ConfigFunction`], an unknown function or version,
    /// [`CatalogError::Busy`], [`CatalogError::Unloadable`],
    /// [`CatalogError::Disk`].
    pub async fn set_live(&self, name: &str, version: &str) -> Result<Arc<Function>, CatalogError> {
        let change = Change::SetLive {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        match self.change(change).await? {
            Applied::Live(function) => Ok(function),
            _ => unreachable!("a switch is applied as one"),
        }
    }

    /// [`Catalog::set_live`]: the version's code is loaded (compiled if it
    /// must be, in the compile slot) first, outside the lock; then the index
    /// is written and the version made live.
    async fn switch(&self, name: &str, version: &str) -> Result<Arc<Function>, CatalogError> {
        if self.is_config_function(name) {
            return Err(CatalogError::ConfigFunction(name.to_owned()));
        }
        if self.deferring() {
            let _index = self.write_live(name, version).await?;
            return Ok(self.registry.set_live_unloaded(name, version)?);
        }
        let loaded = self
            .registry
            .version(name, version)
            .is_some_and(|f| f.is_loaded());
        let _compiling = if loaded {
            None
        } else {
            Some(self.compile_slot().await?)
        };
        let ready = self
            .registry
            .ready(name, version)
            .await
            .map_err(|e| match e {
                ReadyError::Version(e) => CatalogError::Version(e),
                ReadyError::Load(e) => CatalogError::Unloadable {
                    function: name.to_owned(),
                    version: version.to_owned(),
                    reason: e.to_string(),
                },
            })?;
        let _index = self.write_live(name, version).await?;
        // Still a version: deletions take the index lock (held here) too.
        Ok(ready.go_live()?)
    }

    /// Write `version` of `name` as live into the index; the index's lock,
    /// still held.
    async fn write_live(
        &self,
        name: &str,
        version: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, Index>, CatalogError> {
        let mut index = self.index.lock().await;
        self.check_api_function(name, &index)?;
        let mut next = index.clone();
        let record = next
            .functions
            .get_mut(name)
            .ok_or_else(|| VersionError::UnknownFunction(name.to_owned()))?;
        position(record, name, version)?;
        record.live = Some(version.to_owned());
        self.disk.write_index(&next)?;
        *index = next;
        Ok(index)
    }

    /// Delete version `version` of `name`, which must not be live.
    ///
    /// # Errors
    /// [`CatalogError::ConfigFunction`], an unknown function or version,
    /// [`VersionError::Live`], [`CatalogError::Disk`].
    pub async fn remove_version(&self, name: &str, version: &str) -> Result<(), CatalogError> {
        self.change(Change::RemoveVersion {
            name: name.to_owned(),
            version: version.to_owned(),
        })
        .await
        .map(drop)
    }

    async fn remove_version_here(&self, name: &str, version: &str) -> Result<(), CatalogError> {
        let mut index = self.index.lock().await;
        self.check_api_function(name, &index)?;
        let mut next = index.clone();
        let record = next
            .functions
            .get_mut(name)
            .ok_or_else(|| VersionError::UnknownFunction(name.to_owned()))?;
        let position = position(record, name, version)?;
        if record.live.as_deref() == Some(version) {
            return Err(VersionError::Live {
                function: name.to_owned(),
                version: version.to_owned(),
            }
            .into());
        }
        record.versions.remove(position);
        // Its last version: the function goes with it (a function with no
        // version has nothing to serve or list).
        let last = record.versions.is_empty();
        if last {
            next.functions.remove(name);
        }
        self.disk.write_index(&next)?;
        *index = next;
        if last {
            self.registry.remove(name)?;
        } else {
            self.registry.remove_version(name, version)?;
        }
        self.disk.remove_unused(&index);
        Ok(())
    }

    /// Delete function `name` and all its versions; refused while a route
    /// names it.
    ///
    /// # Errors
    /// [`CatalogError::ConfigFunction`], an unknown function,
    /// [`CatalogError::InUse`], [`CatalogError::Disk`].
    pub async fn remove_function(&self, name: &str) -> Result<(), CatalogError> {
        self.change(Change::RemoveFunction {
            name: name.to_owned(),
        })
        .await
        .map(drop)
    }

    async fn remove_function_here(&self, name: &str) -> Result<(), CatalogError> {
        let mut index = self.index.lock().await;
        self.check_api_function(name, &index)?;
        let paths = self.routes.using(name);
        if !paths.is_empty() {
            return Err(CatalogError::InUse {
                function: name.to_owned(),
                paths,
            });
        }
        let mut next = index.clone();
        next.functions.remove(name);
        self.disk.write_index(&next)?;
        *index = next;
        self.registry.remove(name)?;
        self.disk.remove_unused(&index);
        Ok(())
    }

    /// Add or replace the API route `spec.path`; true when it is new.
    ///
    /// # Errors
    /// [`CatalogError::BadRoute`], [`CatalogError::MissingFunction`], a
    /// config file's route ([`CatalogError::Route`]), [`CatalogError::Disk`].
    pub async fn put_route(&self, spec: RouteSpec) -> Result<bool, CatalogError> {
        // Checked here first: a spec no node can take stays out of the log.
        Route::new(spec.clone()).map_err(CatalogError::BadRoute)?;
        match self.change(Change::PutRoute { spec }).await? {
            Applied::Route(new) => Ok(new),
            _ => unreachable!("a route is applied as one"),
        }
    }

    async fn put_route_here(&self, spec: RouteSpec) -> Result<bool, CatalogError> {
        let route = Route::new(spec.clone()).map_err(CatalogError::BadRoute)?;
        let mut index = self.index.lock().await;
        if let Some(missing) = route
            .functions()
            .into_iter()
            .find(|f| self.registry.get(f).is_none())
        {
            return Err(CatalogError::MissingFunction {
                path: spec.path,
                function: missing.to_owned(),
            });
        }
        self.check_api_route(&spec.path)?;
        let mut next = index.clone();
        next.routes.retain(|r| r.path != spec.path);
        let path = spec.path.clone();
        let functions: Vec<String> = route.functions().iter().map(|f| f.to_string()).collect();
        next.routes.push(spec);
        next.routes.sort_by(|a, b| a.path.cmp(&b.path));
        self.disk.write_index(&next)?;
        *index = next;
        let replaced = self.routes.put(route)?;
        tracing::info!(route = %path, functions = ?functions, "route set");
        Ok(replaced.is_none())
    }

    /// Delete the API route at `path`.
    ///
    /// # Errors
    /// No route there or a config file's ([`CatalogError::Route`]),
    /// [`CatalogError::Disk`].
    pub async fn remove_route(&self, path: &str) -> Result<(), CatalogError> {
        self.change(Change::RemoveRoute {
            path: path.to_owned(),
        })
        .await
        .map(drop)
    }

    async fn remove_route_here(&self, path: &str) -> Result<(), CatalogError> {
        let mut index = self.index.lock().await;
        let exists = self
            .routes
            .snapshot()
            .entries()
            .iter()
            .any(|e| e.route.path() == path);
        if !exists {
            return Err(TableError::NotFound(path.to_owned()).into());
        }
        self.check_api_route(path)?;
        let mut next = index.clone();
        next.routes.retain(|r| r.path != path);
        self.disk.write_index(&next)?;
        *index = next;
        self.routes.remove(path)?;
        tracing::info!(route = path, "route deleted");
        Ok(())
    }

    /// Refuse a change to a config file's route.
    fn check_api_route(&self, path: &str) -> Result<(), CatalogError> {
        let from_config = self
            .routes
            .snapshot()
            .entries()
            .iter()
            .any(|e| e.route.path() == path && e.origin == Origin::Config);
        if from_config {
            return Err(TableError::FromConfig(path.to_owned()).into());
        }
        Ok(())
    }

    /// Refuse a change to a config file's function, or to one not there.
    fn check_api_function(&self, name: &str, index: &Index) -> Result<(), CatalogError> {
        if self.is_config_function(name) {
            return Err(CatalogError::ConfigFunction(name.to_owned()));
        }
        if !index.functions.contains_key(name) {
            return Err(VersionError::UnknownFunction(name.to_owned()).into());
        }
        Ok(())
    }
}

/// Where version `version` is in the record of function `name`.
fn position(record: &FunctionRecord, name: &str, version: &str) -> Result<usize, VersionError> {
    record
        .versions
        .iter()
        .position(|v| v.version() == version)
        .ok_or_else(|| VersionError::UnknownVersion {
            function: name.to_owned(),
            version: version.to_owned(),
        })
}

/// A permit of `slot`, waited for up to [`UPLOAD_WAIT`].
async fn wait_for(slot: &Semaphore) -> Result<SemaphorePermit<'_>, CatalogError> {
    match tokio::time::timeout(UPLOAD_WAIT, slot.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(CatalogError::Busy),
    }
}

/// Refuse a component whose version (the first 16 hex digits of
/// `digest`) is that of another component of function `name`, of
/// `digests`.
fn check_clash(
    name: &str,
    digest: &str,
    digests: impl IntoIterator<Item = String>,
) -> Result<(), CatalogError> {
    let version = &digest[..16];
    if digests
        .into_iter()
        .any(|other| other != digest && other.starts_with(version))
    {
        return Err(CatalogError::VersionClash {
            function: name.to_owned(),
            version: version.to_owned(),
        });
    }
    Ok(())
}

/// Delete from `record` its oldest versions beyond `max`, never the live
/// one nor those in `keep` (the version just added, the one live before
/// it: the one to roll back to); the versions deleted.
fn prune(record: &mut FunctionRecord, keep: &[Option<&str>], max: NonZeroUsize) -> Vec<String> {
    let mut pruned = Vec::new();
    while record.versions.len() > max.get() {
        let Some(oldest) = record.versions.iter().position(|v| {
            let version = Some(v.version());
            record.live.as_deref() != version && !keep.contains(&version)
        }) else {
            break;
        };
        pruned.push(record.versions.remove(oldest).version().to_owned());
    }
    pruned
}

fn parse_created(text: &str) -> SystemTime {
    humantime::parse_rfc3339(text).unwrap_or_else(|_| SystemTime::now())
}

#[cfg(test)]
mod tests;
