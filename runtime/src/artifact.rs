//! Precompiled artifacts on disk, which the runtime later loads as native
//! code, so nobody but the gateway's user may be able to plant or swap one:
//!
//! - the directory (`runtime.artifact_dir`) is a private directory (see
//!   [`crate::private_dir`]): created 0700, owned by the gateway's user,
//!   writable by nobody else, checked again before every write; its parents
//!   are the operator's (a volume's root may be root-owned or writable by
//!   others);
//! - an artifact is written 0600 to a new temporary file (never an existing
//!   one, never through a link) in that directory and renamed into place;
//! - it is read back without following a symbolic link, and only if it is
//!   still the file that was written: same length and BLAKE3 digest as the
//!   [`Seal`] kept in memory when it was written.
//!
//! Nothing here compiles or loads code: a caller whose artifact does not
//! pass recompiles from the component it keeps.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::LoadError;
use crate::private_dir;

/// What an artifact was when it was written: checked before it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seal {
    /// Its length, in bytes.
    len: u64,
    /// Its BLAKE3 digest: checked at every load from zero, where SHA-256
    /// (78 us for the echo function's 160 KB artifact here) doubled the
    /// reload; BLAKE3 takes 20 us.
    digest: [u8; 32],
}

impl Seal {
    fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            digest: *blake3::hash(bytes).as_bytes(),
        }
    }
}

/// Why an artifact on disk cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Stale {
    /// There is no file at its path.
    #[error("is missing")]
    Missing,
    /// A symbolic link, a directory, a FIFO or anything but a regular file
    /// is at its path.
    #[error("is not a regular file (a symbolic link is not followed)")]
    NotAFile,
    /// The file is not the one written: another length or digest.
    #[error("was replaced or damaged (it is not the file Tidegate wrote)")]
    Replaced,
    /// It could not be read.
    #[error("could not be read: {0}")]
    Io(io::Error),
}

/// The setting the artifact directory comes from, named in its errors.
const KEY: &str = "runtime.artifact_dir";

/// Create the artifact directory (0700, with missing parents) if needed,
/// and check that it is fit to load native code from: a private directory
/// of the user Tidegate runs as (see [`crate::private_dir::prepare`]).
///
/// # Errors
/// [`LoadError::ArtifactDir`] naming the directory, what is wrong and what
/// to do.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), LoadError> {
    private_dir::prepare(KEY, dir).map_err(|e| LoadError::ArtifactDir {
        path: e.path,
        reason: e.problem.to_string(),
    })
}

/// Write `bytes` as function `name`'s artifact at `path` (in `dir`, checked
/// first): a new 0600 temporary file in `dir`, synced, then renamed over
/// `path` (which replaces a link there rather than writing through it).
///
/// # Errors
/// [`LoadError::ArtifactDir`] when the directory is not fit (see
/// [`prepare_dir`]), [`LoadError::Artifact`] when the file cannot be written.
pub(crate) fn write(dir: &Path, path: &Path, name: &str, bytes: &[u8]) -> Result<Seal, LoadError> {
    prepare_dir(dir)?;
    let failed = |source: io::Error| LoadError::Artifact {
        name: name.to_owned(),
        path: path.to_path_buf(),
        source,
    };
    let mut file = tempfile::Builder::new()
        .prefix(".artifact-")
        .suffix(".tmp")
        .make_in(dir, |temp| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(no_follow())
                .open(temp)
        })
        .map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.as_file().sync_all().map_err(failed)?;
    file.persist(path).map_err(|e| failed(e.error))?;
    Ok(Seal::of(bytes))
}

/// Open the artifact at `path` if it is the file sealed by `seal`: its
/// bytes are hashed through the returned descriptor, so the caller can map
/// that same file (`/proc/self/fd/N`) without copying it, whatever becomes
/// of the path meanwhile.
///
/// # Errors
/// A [`Stale`] saying why it cannot be loaded.
pub(crate) fn open_checked(path: &Path, seal: Seal) -> Result<File, Stale> {
    let mut file = open_regular(path)?;
    let len = file.metadata().map_err(Stale::Io)?.len();
    if len != seal.len {
        return Err(Stale::Replaced);
    }
    let mut hasher = blake3::Hasher::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut seen = 0u64;
    loop {
        let n = file.read(&mut chunk).map_err(Stale::Io)?;
        if n == 0 {
            break;
        }
        seen += n as u64;
        // A file that grew is not it.
        if seen > len {
            return Err(Stale::Replaced);
        }
        hasher.update(&chunk[..n]);
    }
    let sealed = Seal {
        len: seen,
        digest: *hasher.finalize().as_bytes(),
    };
    if sealed != seal {
        return Err(Stale::Replaced);
    }
    Ok(file)
}

/// Read the artifact at `path` if it is the file sealed by `seal`.
///
/// # Errors
/// A [`Stale`] saying why it cannot be loaded.
pub(crate) fn read(path: &Path, seal: Seal) -> Result<Vec<u8>, Stale> {
    let mut file = open_regular(path)?;
    let len = file.metadata().map_err(Stale::Io)?.len();
    if len != seal.len {
        return Err(Stale::Replaced);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).map_err(|_| Stale::Replaced)?);
    // Read one byte past the sealed length: a file that grew is not it.
    Read::by_ref(&mut file)
        .take(len.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(Stale::Io)?;
    if Seal::of(&bytes) != seal {
        return Err(Stale::Replaced);
    }
    Ok(bytes)
}

/// Open `path` for reading only if it is a regular file, without following
/// a symbolic link, and without blocking on a FIFO planted in its place.
fn open_regular(path: &Path) -> Result<File, Stale> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(no_follow() | non_blocking())
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Stale::Missing,
            // ELOOP: the last component is a symbolic link.
            _ if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                Stale::NotAFile
            }
            _ => Stale::Io(e),
        })?;
    let meta = file.metadata().map_err(Stale::Io)?;
    if !meta.is_file() {
        return Err(Stale::NotAFile);
    }
    Ok(file)
}

/// `O_NOFOLLOW`, as `OpenOptionsExt::custom_flags` takes it.
fn no_follow() -> i32 {
    flag(rustix::fs::OFlags::NOFOLLOW)
}

/// `O_NONBLOCK`: opening a FIFO for reading would otherwise wait for a
/// writer. It changes nothing for a regular file.
fn non_blocking() -> i32 {
    flag(rustix::fs::OFlags::NONBLOCK)
}

fn flag(flag: rustix::fs::OFlags) -> i32 {
    // Open flags are small positive C ints; the conversion cannot fail.
    i32::try_from(flag.bits()).unwrap_or(0)
}

/// The path of a function version's artifact in `dir`.
pub(crate) fn path_in(dir: &Path, name: &str, version: &str) -> PathBuf {
    dir.join(format!("{name}-{version}.cwasm"))
}

/// What an artifact was compiled from: its component (SHA-256) by an engine
/// of these settings ([`engine_fingerprint`]). Kept beside the artifact in
/// its seal file, so a restart reuses the artifact only for that component
/// and that engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Source {
    /// SHA-256 of the component.
    pub(crate) component: [u8; 32],
    /// The engine's [`engine_fingerprint`].
    pub(crate) engine: u64,
}

/// A fingerprint of everything about `engine` that precompiled code depends
/// on (wasmtime's version, target, compiler settings, features): artifacts
/// of another fingerprint are compiled again rather than loaded.
pub(crate) fn engine_fingerprint(engine: &wasmtime::Engine) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the same engine gives the same value in every process of
    // this binary; another binary may give another, which only costs a
    // compile.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.finish()
}

/// The seal file of the artifact at `path`: its [`Seal`] and [`Source`],
/// so that a restart can trust the artifact as if this process had written
/// it.
fn seal_path(path: &Path) -> PathBuf {
    path.with_extension("seal")
}

/// First line of a seal file; another one is not read.
const SEAL_FORMAT: &str = "tidegate-artifact-seal 1";

/// Write `bytes` as the artifact at `path` (see [`write`]), then its seal
/// file, which says what it was compiled from. The artifact is written
/// first: a crash in between leaves an old seal that does not match it,
/// so the artifact is compiled again rather than trusted.
///
/// # Errors
/// As [`write`].
pub(crate) fn write_sealed(
    dir: &Path,
    path: &Path,
    name: &str,
    bytes: &[u8],
    source: Source,
) -> Result<Seal, LoadError> {
    let seal = write(dir, path, name, bytes)?;
    let text = format!(
        "{SEAL_FORMAT}\nengine {:016x}\ncomponent {}\nlength {}\nblake3 {}\n",
        source.engine,
        hex(&source.component),
        seal.len,
        hex(&seal.digest),
    );
    write(dir, &seal_path(path), name, text.as_bytes())?;
    Ok(seal)
}

/// The seal of the artifact at `path` as its seal file gives it, if that
/// file says the artifact was compiled from `source`; why not otherwise.
/// The artifact itself is not read here: [`open_checked`] checks it
/// against the seal before it is loaded.
pub(crate) fn saved_seal(path: &Path, source: Source) -> Result<Seal, String> {
    let seal_file = seal_path(path);
    let mut text = String::new();
    open_regular(&seal_file)
        .map_err(|stale| format!("its seal file {} {stale}", seal_file.display()))?
        .take(1024)
        .read_to_string(&mut text)
        .map_err(|e| {
            format!(
                "its seal file {} could not be read: {e}",
                seal_file.display()
            )
        })?;
    let (saved, seal) = parse_seal(&text)
        .ok_or_else(|| format!("its seal file {} is damaged", seal_file.display()))?;
    if saved.component != source.component {
        return Err("was compiled from another component".into());
    }
    if saved.engine != source.engine {
        return Err("was compiled by another engine (another Tidegate or wasmtime build, or other runtime settings)".into());
    }
    Ok(seal)
}

fn parse_seal(text: &str) -> Option<(Source, Seal)> {
    let mut lines = text.lines();
    if lines.next()? != SEAL_FORMAT {
        return None;
    }
    let mut field = |key: &str| lines.next()?.strip_prefix(key)?.strip_prefix(' ');
    let engine = u64::from_str_radix(field("engine")?, 16).ok()?;
    let component = unhex(field("component")?)?;
    let len = field("length")?.parse().ok()?;
    let digest = unhex(field("blake3")?)?;
    Some((Source { component, engine }, Seal { len, digest }))
}

/// Remove the artifact at `path` and its seal file, if they exist.
pub(crate) fn remove(path: &Path) {
    for file in [path.to_path_buf(), seal_path(path)] {
        if let Err(e) = std::fs::remove_file(&file)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", file.display());
        }
    }
}

/// Lower-case hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn dir() -> (tempfile::TempDir, PathBuf) {
        let base = tempfile::tempdir().expect("temp dir");
        let dir = base.path().join("artifacts");
        (base, dir)
    }

    #[test]
    fn the_directory_is_created_0700_and_artifacts_0600() {
        let (_base, dir) = dir();
        let path = path_in(&dir, "f", "01");
        write(&dir, &path, "f", b"code").expect("written");
        let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).expect("listed").count(), 1);
    }

    #[test]
    fn an_artifact_reads_back_only_as_written() {
        let (_base, dir) = dir();
        let path = path_in(&dir, "f", "01");
        let seal = write(&dir, &path, "f", b"code").expect("written");
        assert_eq!(read(&path, seal).expect("read"), b"code");

        // Same length, other bytes.
        std::fs::write(&path, b"evil").expect("replaced");
        assert!(matches!(read(&path, seal), Err(Stale::Replaced)));
        // Longer.
        std::fs::write(&path, b"code and more").expect("replaced");
        assert!(matches!(read(&path, seal), Err(Stale::Replaced)));

        std::fs::remove_file(&path).expect("removed");
        assert!(matches!(read(&path, seal), Err(Stale::Missing)));
    }

    #[test]
    fn a_symbolic_link_or_a_fifo_is_not_read() {
        let (base, dir) = dir();
        let path = path_in(&dir, "f", "01");
        let seal = write(&dir, &path, "f", b"code").expect("written");
        // A link to a file with exactly the sealed contents is still refused:
        // the file it points to could change after the check.
        let elsewhere = base.path().join("elsewhere");
        std::fs::write(&elsewhere, b"code").expect("written");
        std::fs::remove_file(&path).expect("removed");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("linked");
        assert!(matches!(read(&path, seal), Err(Stale::NotAFile)));

        std::fs::remove_file(&path).expect("removed");
        rustix::fs::mkfifoat(rustix::fs::CWD, &path, rustix::fs::Mode::RUSR).expect("fifo made");
        assert!(matches!(read(&path, seal), Err(Stale::NotAFile)));
    }

    #[test]
    fn writing_replaces_a_link_instead_of_writing_through_it() {
        let (base, dir) = dir();
        let path = path_in(&dir, "f", "01");
        write(&dir, &path, "f", b"first").expect("written");
        let target = base.path().join("target");
        std::fs::write(&target, b"theirs").expect("written");
        std::fs::remove_file(&path).expect("removed");
        std::os::unix::fs::symlink(&target, &path).expect("linked");
        let seal = write(&dir, &path, "f", b"second").expect("written");
        assert_eq!(std::fs::read(&target).expect("read"), b"theirs");
        assert_eq!(read(&path, seal).expect("read"), b"second");
    }

    #[test]
    fn a_seal_file_vouches_only_for_its_component_and_engine() {
        let (_base, dir) = dir();
        let path = path_in(&dir, "f", "01");
        let source = Source {
            component: [7; 32],
            engine: 42,
        };
        let seal = write_sealed(&dir, &path, "f", b"code", source).expect("written");
        assert_eq!(saved_seal(&path, source), Ok(seal));
        assert_eq!(read(&path, seal).expect("read"), b"code");
        let other_engine = Source {
            engine: 43,
            ..source
        };
        let why = saved_seal(&path, other_engine).unwrap_err();
        assert!(why.contains("another engine"), "{why}");
        let other_component = Source {
            component: [8; 32],
            ..source
        };
        assert!(saved_seal(&path, other_component).is_err());
        // The artifact rewritten without its seal (a crash in between) no
        // longer matches the saved seal.
        write(&dir, &path, "f", b"edoc").expect("written");
        let stale = saved_seal(&path, source).expect("the old seal");
        assert!(matches!(read(&path, stale), Err(Stale::Replaced)));
        // A damaged seal file is named.
        std::fs::write(seal_path(&path), "garbage").expect("damaged");
        let why = saved_seal(&path, source).unwrap_err();
        assert!(
            why.contains("f-01.seal") && why.contains("damaged"),
            "{why}"
        );
        remove(&path);
        assert!(saved_seal(&path, source).unwrap_err().contains("missing"));
        assert!(!path.exists());
    }

    #[test]
    fn a_directory_others_can_write_to_is_refused() {
        let (_base, dir) = dir();
        std::fs::create_dir(&dir).expect("created");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let error = prepare_dir(&dir).expect_err("refused");
        assert!(
            error.to_string().contains(&dir.display().to_string()),
            "{error}"
        );
        assert!(
            error.to_string().contains("writable by other users"),
            "{error}"
        );
    }

    #[test]
    fn a_link_in_place_of_the_directory_is_refused() {
        let (base, dir) = dir();
        let real = base.path().join("real");
        std::fs::create_dir(&real).expect("created");
        std::os::unix::fs::symlink(&real, &dir).expect("linked");
        let error = prepare_dir(&dir).expect_err("refused");
        assert!(error.to_string().contains("not a directory"), "{error}");
    }
}
