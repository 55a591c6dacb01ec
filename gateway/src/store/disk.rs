//! The files of the catalog, under `<server.state_dir>/functions/` (a
//! private directory: 0700, the gateway's user only):
//!
//! - `components/<sha256>.wasm`: every uploaded component, by digest, so a
//!   component uploaded under two names is kept once;
//! - `index.json`: the functions, their versions (digest, size, created)
//!   and the live one, and the routes added through the API.
//!
//! Every file is written whole to a new 0600 temporary file in its
//! directory, synced, renamed into place and the directory synced: a crash
//! leaves the old file or the new one, never half of one. A component is
//! written before the index that names it; one named by no index (a crash
//! in between, or a deleted version) is removed at the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use runtime::private_dir::{self, PrivateDirError};
use serde::{Deserialize, Serialize};

use crate::router::RouteSpec;

/// The catalog's directory under `server.state_dir`.
pub const DIR: &str = "functions";

/// The version of the index's format this build reads and writes.
const FORMAT: u32 = 1;

/// What the catalog keeps: functions, versions, live versions, routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// The format of this file; another one is refused.
    pub format: u32,
    /// The uploaded functions, by name.
    pub functions: BTreeMap<String, FunctionRecord>,
    /// The routes added through the API (not the config file's).
    pub routes: Vec<RouteSpec>,
    /// In a cluster: the position in the cluster's log of the last change
    /// applied here (the next start reads on from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_offset: Option<u64>,
    /// In a cluster: this node is reading the cluster's log for the first
    /// time and has not reached its end yet (what it holds is part of the
    /// history, not the cluster's present).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catching_up: bool,
}

/// One uploaded function.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRecord {
    /// The live version (16 hexadecimal digits), if one is.
    pub live: Option<String>,
    /// Every version, oldest first.
    pub versions: Vec<VersionRecord>,
}

/// One version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    /// SHA-256 of the component, hexadecimal; its first 16 digits are the
    /// version.
    pub digest: String,
    /// The component's size, in bytes.
    pub size: u64,
    /// When it was uploaded, RFC 3339 (UTC, seconds).
    pub created: String,
}

impl VersionRecord {
    /// The version: the digest's first 16 digits.
    pub fn version(&self) -> &str {
        self.digest.get(..16).unwrap_or(&self.digest)
    }
}

impl Index {
    /// Every component digest a version names.
    pub fn digests(&self) -> BTreeSet<&str> {
        self.functions
            .values()
            .flat_map(|f| f.versions.iter().map(|v| v.digest.as_str()))
            .collect()
    }
}

/// Why the catalog's files cannot be read or written. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The directory cannot be created or is not private.
    #[error(transparent)]
    Dir(#[from] PrivateDirError),
    /// A file cannot be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The index is not one this build can read, or contradicts itself.
    #[error(
        "{}: {reason}; the gateway does not start without its uploaded functions: restore the \
         file from a backup, or move it aside to start with none",
        .path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A component the index names is missing or not what was uploaded.
    #[error(
        "{}: the component of version {version} of function {function:?} {problem}; restore it \
         from a backup (its SHA-256 must be its name), or remove the version from {}",
        .path.display(),
        .index.display()
    )]
    Component {
        /// The component file.
        path: PathBuf,
        /// The index naming it.
        index: PathBuf,
        /// The function.
        function: String,
        /// The version.
        version: String,
        /// `is missing`, `is damaged`, ...
        problem: String,
    },
}

/// The catalog's directory.
#[derive(Debug)]
pub struct Disk {
    /// `<state_dir>/functions`.
    dir: PathBuf,
}

/// The setting the directory comes from, named in its errors.
const KEY: &str = "server.state_dir";

impl Disk {
    /// The catalog directory under `state_dir`, checked to be private if
    /// it exists. It is created with the first change: a state directory
    /// nothing is uploaded to is left alone (see [`crate::state_dir`]).
    ///
    /// # Errors
    /// [`DiskError::Dir`] when it is not private.
    pub fn open(state_dir: &Path) -> Result<Self, DiskError> {
        let dir = state_dir.join(DIR);
        if dir.symlink_metadata().is_ok() {
            private_dir::prepare(KEY, &dir)?;
        }
        Ok(Self { dir })
    }

    /// The index file.
    pub fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    /// The file of the component with this digest.
    pub fn component_path(&self, digest: &str) -> PathBuf {
        self.dir.join("components").join(format!("{digest}.wasm"))
    }

    /// Read the index; an empty one when there is none yet.
    ///
    /// # Errors
    /// [`DiskError::Corrupt`] when it cannot be parsed or is of another
    /// format, [`DiskError::Io`] when it cannot be read.
    pub fn read_index(&self) -> Result<Index, DiskError> {
        let path = self.index_path();
        let text = match read_file(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Index {
                    format: FORMAT,
                    ..Index::default()
                });
            }
            Err(source) => return Err(DiskError::Io { path, source }),
        };
        let corrupt = |reason: String| DiskError::Corrupt {
            path: path.clone(),
            reason,
        };
        let index: Index = serde_json::from_slice(&text)
            .map_err(|e| corrupt(format!("not a Tidegate function index ({e})")))?;
        if index.format != FORMAT {
            return Err(corrupt(format!(
                "format {} is not the format {FORMAT} this build reads",
                index.format
            )));
        }
        for (name, function) in &index.functions {
            if !crate::router::is_function_name(name) {
                return Err(corrupt(format!("{name:?} is not a function name")));
            }
            for version in &function.versions {
                if version.digest.len() != 64
                    || !version
                        .digest
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    return Err(corrupt(format!(
                        "function {name:?} has a version whose digest {:?} is not a SHA-256",
                        version.digest
                    )));
                }
            }
            if let Some(live) = &function.live
                && !function.versions.iter().any(|v| v.version() == live)
            {
                return Err(corrupt(format!(
                    "function {name:?} names {live} live, which is none of its versions"
                )));
            }
        }
        Ok(index)
    }

    /// Replace the index with `index`, atomically.
    ///
    /// # Errors
    /// [`DiskError`] naming the directory or file that failed.
    pub fn write_index(&self, index: &Index) -> Result<(), DiskError> {
        let mut text = serde_json::to_vec_pretty(index).map_err(|e| DiskError::Io {
            path: self.index_path(),
            source: io::Error::other(e),
        })?;
        text.push(b'\n');
        self.write_atomically(&self.dir, &self.index_path(), &text)
    }

    /// Keep `wasm` as the component of this digest.
    ///
    /// # Errors
    /// [`DiskError`] naming the directory or file that failed.
    pub fn write_component(&self, digest: &str, wasm: &[u8]) -> Result<(), DiskError> {
        self.write_atomically(
            &self.dir.join("components"),
            &self.component_path(digest),
            wasm,
        )
    }

    /// The component of version `version` of `function`, checked against
    /// its digest.
    ///
    /// # Errors
    /// [`DiskError::Component`] when it is missing, unreadable or not the
    /// component of that digest.
    pub fn read_component(
        &self,
        function: &str,
        version: &VersionRecord,
    ) -> Result<Bytes, DiskError> {
        let path = self.component_path(&version.digest);
        let problem = |problem: String| DiskError::Component {
            path: path.clone(),
            index: self.index_path(),
            function: function.to_owned(),
            version: version.version().to_owned(),
            problem,
        };
        let wasm = read_file(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => problem("is missing".into()),
            _ => problem(format!("cannot be read ({e})")),
        })?;
        if runtime::registry::digest_hex(&wasm) != version.digest {
            return Err(problem(
                "is damaged or was replaced (its SHA-256 is not its name)".into(),
            ));
        }
        Ok(wasm.into())
    }

    /// Remove every component file `index` does not name, and temporary
    /// files a crash left behind.
    pub fn remove_unused(&self, index: &Index) {
        let used = index.digests();
        let components = self.dir.join("components");
        for dir in [&self.dir, &components] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let unused = if name.starts_with(TEMP_PREFIX) {
                    true
                } else if dir == &components {
                    name.strip_suffix(".wasm")
                        .is_none_or(|digest| !used.contains(digest))
                } else {
                    false
                };
                if unused {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {
                            tracing::debug!(file = %entry.path().display(), "unused file removed")
                        }
                        Err(e) => tracing::warn!("cannot remove {}: {e}", entry.path().display()),
                    }
                }
            }
        }
    }

    /// Write `bytes` to `path` in `dir`: a new 0600 temporary file, synced,
    /// renamed over `path`, then the directory and its parents up to the
    /// state directory synced so the rename (and the directories the first
    /// change creates) are durable. The directory is checked to be private first.
    fn write_atomically(&self, dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), DiskError> {
        private_dir::prepare(KEY, dir)?;
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DiskError::Io { path, source }
        };
        let temp = dir.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::now_v7().simple()));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(failed(&temp)(e));
        }
        if let Err(e) = std::fs::rename(&temp, path) {
            let _ = std::fs::remove_file(&temp);
            return Err(failed(path)(e));
        }
        // The directory holds the rename; its parents, up to the state
        // directory, the directories the first change created. The file is
        // in place now, so the change is made: a directory that cannot be
        // synced (some filesystems refuse) is a warning, not a failure the
        // caller would undo in memory while the disk kept it.
        let state_dir = self.dir.parent().unwrap_or(&self.dir);
        for dir in dir.ancestors() {
            if let Err(e) = File::open(dir).and_then(|dir| dir.sync_all()) {
                tracing::warn!(
                    "cannot sync directory {}: {e} (the change is made, but may not survive a \
                     power loss)",
                    dir.display()
                );
            }
            if dir == state_dir {
                break;
            }
        }
        Ok(())
    }
}

/// Temporary files start so; a crash may leave one.
const TEMP_PREFIX: &str = ".tmp-";

/// Read a whole file, without following a symbolic link.
fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn record(wasm: &[u8]) -> VersionRecord {
        VersionRecord {
            digest: runtime::registry::digest_hex(wasm),
            size: wasm.len() as u64,
            created: "2025-01-02T03:04:05Z".into(),
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_index_and_components_round_trip_private_and_whole() {
        let state = tempfile::tempdir().unwrap();
        let disk = Disk::open(state.path()).unwrap();
        assert_eq!(disk.read_index().unwrap().functions.len(), 0, "none yet");
        assert!(
            !state.path().join(DIR).exists(),
            "created with the first change only"
        );
        let wasm = b"\0asm component bytes";
        let version = record(wasm);
        disk.write_component(&version.digest, wasm).unwrap();
        let mut index = Index {
            format: FORMAT,
            ..Index::default()
        };
        index.functions.insert(
            "chat".into(),
            FunctionRecord {
                live: Some(version.version().into()),
                versions: vec![version.clone()],
            },
        );
        index.routes.push(RouteSpec {
            path: "/chat".into(),
            function: Some("chat".into()),
            ..RouteSpec::default()
        });
        disk.write_index(&index).unwrap();
        assert_eq!(disk.read_index().unwrap(), index);
        assert_eq!(
            &disk.read_component("chat", &version).unwrap()[..],
            &wasm[..]
        );
        assert_eq!(mode(&state.path().join(DIR)), 0o700);
        assert_eq!(mode(&disk.index_path()), 0o600);
        assert_eq!(mode(&disk.component_path(&version.digest)), 0o600);

        // A leftover temporary file and an unused component go; the used
        // one stays.
        std::fs::write(state.path().join(DIR).join(".tmp-x"), b"x").unwrap();
        let unused = record(b"other");
        disk.write_component(&unused.digest, b"other").unwrap();
        disk.remove_unused(&index);
        assert!(!disk.component_path(&unused.digest).exists());
        assert!(disk.component_path(&version.digest).exists());
        let left: Vec<_> = std::fs::read_dir(state.path().join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !left.iter().any(|name| name.starts_with(TEMP_PREFIX)),
            "{left:?}"
        );
    }

    #[test]
    fn a_corrupt_index_is_refused_naming_the_file() {
        let state = tempfile::tempdir().unwrap();
        let disk = Disk::open(state.path()).unwrap();
        std::fs::create_dir(state.path().join(DIR)).unwrap();
        let index = disk.index_path().display().to_string();
        for (text, why) in [
            ("{not json", "not a Tidegate function index"),
            (
                r#"{"format": 2, "functions": {}, "routes": []}"#,
                "format 2",
            ),
            (
                r#"{"format": 1, "functions": {"Bad": {"live": null, "versions": []}}, "routes": []}"#,
                "not a function name",
            ),
            (
                r#"{"format": 1, "functions": {"f": {"live": "0123456789abcdef", "versions": []}}, "routes": []}"#,
                "none of its versions",
            ),
        ] {
            std::fs::write(disk.index_path(), text).unwrap();
            let error = disk.read_index().unwrap_err().to_string();
            assert!(error.contains(&index) && error.contains(why), "{error}");
        }
    }

    #[test]
    fn a_missing_or_damaged_component_is_named() {
        let state = tempfile::tempdir().unwrap();
        let disk = Disk::open(state.path()).unwrap();
        std::fs::create_dir_all(state.path().join(DIR).join("components")).unwrap();
        let version = record(b"component");
        let error = disk.read_component("f", &version).unwrap_err().to_string();
        assert!(
            error.contains(&disk.component_path(&version.digest).display().to_string())
                && error.contains("is missing")
                && error.contains(version.version()),
            "{error}"
        );
        std::fs::write(disk.component_path(&version.digest), b"tampered").unwrap();
        let error = disk.read_component("f", &version).unwrap_err().to_string();
        assert!(error.contains("damaged"), "{error}");
    }
}
