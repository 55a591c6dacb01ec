//! Private directories: the directories Tidegate creates for itself and
//! reads back (precompiled artifacts, the `--dev` certificate; the spool can
//! use it too). What is in them is trusted (artifacts are loaded as native
//! code), so [`prepare`] makes sure that only the gateway's user can change
//! them:
//!
//! - a missing one is created 0700, with its missing parents (0700 too);
//! - it must be a directory, not a symbolic link to one (not followed);
//! - it must be owned by the gateway's effective uid;
//! - it may not be writable by others (every user but its owner and its
//!   group): any of them may already have planted files in it, and no
//!   platform makes a directory so, only a mistake; it is refused;
//! - any permission of its group (and read or search by others) is taken
//!   away, leaving 0700 plus any setgid bit. A group is granted by someone
//!   with the right to (the operator, the platform): on Kubernetes with an
//!   `fsGroup`, the kubelet makes every directory of a volume
//!   group-writable again at each mount (unless `fsGroupChangePolicy:
//!   OnRootMismatch`), so refusing would stop a restarted pod.
//!
//! Parents are the operator's and are not checked: a volume's mount root is
//! typically `root:<fsGroup>` mode 2775 (a PersistentVolumeClaim with an
//! `fsGroup`) or 0777 (an `emptyDir`). Why that is safe: whoever may write
//! to a parent can rename our directory away and put one of their own, or a
//! link, in its place. A link is not followed, and a directory of theirs is
//! owned by them, so [`prepare`] refuses it; the artifact store calls it
//! again before every write, and loads an artifact only if its length and
//! SHA-256 match what this process wrote, so what is swapped in after a
//! check is never loaded either. They could only put back a directory of
//! ours moved from elsewhere, and nothing in it is trusted without that
//! digest. What such a parent still allows is deleting or swapping the
//! directory between a check and a use: a denial of service for artifacts;
//! for the `--dev` certificate, written and read back at start-up, only
//! with a `server.state_dir` others may write to, which the `--dev` default
//! (in the user's home) is not.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode a private directory is created with, and made private to.
pub const MODE: u32 = 0o700;

/// A directory that cannot be used as a private directory.
#[derive(Debug, thiserror::Error)]
#[error("{key} {}: {problem}", .path.display())]
pub struct PrivateDirError {
    /// The setting the directory comes from (`runtime.artifact_dir`,
    /// `server.state_dir`, `queue.spool_dir`), so the operator knows what
    /// to change.
    pub key: &'static str,
    /// The directory.
    pub path: PathBuf,
    /// What is wrong with it, and what to do.
    pub problem: Problem,
}

/// What is wrong with a private directory. Each message ends with what to
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// It, or a missing parent, could not be created (a read-only file
    /// system, no permission).
    #[error(
        "cannot be created ({0}): point it at a place on a writable volume where the gateway's \
         user may create it"
    )]
    Create(io::Error),
    /// It exists but could not be opened or inspected.
    #[error("cannot be opened ({0}): point it at a directory the gateway's user may open")]
    Open(io::Error),
    /// A file, a symbolic link or anything but a directory is in its place.
    #[error(
        "is not a directory (a symbolic link is not followed): point it at a directory, or at a \
         path where the gateway can create one"
    )]
    NotADirectory,
    /// Another user owns it: they could plant files in it.
    #[error(
        "is owned by uid {owner}, not by uid {user} that Tidegate runs as, so another user could \
         plant files in it: point it at a subdirectory of it, which Tidegate creates for itself, \
         or chown it to uid {user}"
    )]
    Owner {
        /// Its owner.
        owner: u32,
        /// The gateway's effective uid.
        user: u32,
    },
    /// Other users (every user but its owner and group) may write to it,
    /// so files may already have been planted in it.
    #[error(
        "is writable by other users (mode {mode:o}), any of whom may have planted files in it: \
         point it at a subdirectory of it, which Tidegate creates for itself, or empty it and \
         chmod it 700"
    )]
    WritableByOthers {
        /// Its permission bits.
        mode: u32,
    },
    /// Taking the permissions of its group and others away failed.
    #[error("cannot be made private (chmod {MODE:o}: {0})")]
    MakePrivate(io::Error),
}

/// Make `dir` a private directory of the gateway's user, as the module
/// documentation says: create it 0700 (with missing parents) when missing,
/// refuse it unless it is a directory of this user that others may not
/// write to, and take away any permission of its group and others.
///
/// `key` is the setting `dir` comes from; errors name it. Call this before
/// every use that trusts the directory's contents: it is cheap (a `mkdir`,
/// an `open` and an `fstat`).
///
/// # Errors
/// A [`PrivateDirError`] naming `key`, `dir`, what is wrong and what to do.
pub fn prepare(key: &'static str, dir: &Path) -> Result<(), PrivateDirError> {
    let fail = |problem| PrivateDirError {
        key,
        path: dir.to_path_buf(),
        problem,
    };
    match DirBuilder::new().recursive(true).mode(MODE).create(dir) {
        Ok(()) => {}
        // Something else is in its place: the open below says what.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(Problem::Create(e))),
    }
    // The checks and the chmod go through one descriptor, so they are about
    // the same directory, and a link in its place is not followed.
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(flag(rustix::fs::OFlags::DIRECTORY) | flag(rustix::fs::OFlags::NOFOLLOW))
        .open(dir);
    let directory = match opened {
        Ok(directory) => directory,
        Err(e)
            if [rustix::io::Errno::LOOP, rustix::io::Errno::NOTDIR]
                .iter()
                .any(|errno| e.raw_os_error() == Some(errno.raw_os_error())) =>
        {
            return Err(fail(Problem::NotADirectory));
        }
        Err(e) => return Err(fail(Problem::Open(e))),
    };
    let meta = directory.metadata().map_err(|e| fail(Problem::Open(e)))?;
    let user = rustix::process::geteuid().as_raw();
    if meta.uid() != user {
        return Err(fail(Problem::Owner {
            owner: meta.uid(),
            user,
        }));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(fail(Problem::WritableByOthers { mode }));
    }
    if mode & 0o077 != 0 {
        // Keeps the setgid bit a volume's directories carry.
        let private = mode & !0o077;
        directory
            .set_permissions(Permissions::from_mode(private))
            .map_err(|e| fail(Problem::MakePrivate(e)))?;
        tracing::info!(
            key,
            path = %dir.display(),
            was = format_args!("{mode:o}"),
            now = format_args!("{private:o}"),
            "directory made private to the gateway's user again"
        );
    }
    Ok(())
}

/// An open flag, as `OpenOptionsExt::custom_flags` takes it.
fn flag(flag: rustix::fs::OFlags) -> i32 {
    // Open flags are small positive C ints; the conversion cannot fail.
    i32::try_from(flag.bits()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "runtime.artifact_dir";

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, Permissions::from_mode(mode)).expect("chmod");
    }

    /// Whether this process may give files away (tests of other owners need
    /// it); prints why a test is skipped when not.
    fn may_chown() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            println!("skipped: giving a directory to another user needs root");
        }
        root
    }

    #[test]
    fn a_missing_directory_and_its_missing_parents_are_created_0700() {
        let base = tempfile::tempdir().expect("temp dir");
        let parent = base.path().join("a/b");
        let dir = parent.join("private");
        prepare(KEY, &dir).expect("created");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&parent), 0o700);
        assert_eq!(mode(&base.path().join("a")), 0o700);
        // Twice is fine.
        prepare(KEY, &dir).expect("prepared again");
    }

    #[test]
    fn a_volume_root_of_root_or_another_owner_group_writable_and_setgid_is_a_fine_parent() {
        if !may_chown() {
            return;
        }
        // A PersistentVolumeClaim with fsGroup 65532: root:65532 2775; and
        // the same owned by someone who is not the gateway's user.
        for owner in [0, 65534] {
            let base = tempfile::tempdir().expect("temp dir");
            let volume = base.path().join("volume");
            std::fs::create_dir(&volume).expect("created");
            std::os::unix::fs::chown(&volume, Some(owner), Some(65532)).expect("chown");
            chmod(&volume, 0o2775);
            let dir = volume.join("artifacts");
            prepare(KEY, &dir).expect("a private subdirectory of a volume root");
            let meta = std::fs::symlink_metadata(&dir).expect("exists");
            assert_eq!(meta.uid(), rustix::process::geteuid().as_raw());
            assert_eq!(mode(&dir) & 0o777, 0o700, "owner {owner}");
            // The volume itself is left as it is.
            assert_eq!(mode(&volume), 0o2775);
        }
    }

    #[test]
    fn a_world_writable_parent_like_an_empty_dir_volume_is_a_fine_parent() {
        let base = tempfile::tempdir().expect("temp dir");
        let volume = base.path().join("empty-dir");
        std::fs::create_dir(&volume).expect("created");
        chmod(&volume, 0o777);
        let dir = volume.join("spool");
        prepare(KEY, &dir).expect("a private subdirectory of an emptyDir");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&volume), 0o777);
    }

    #[test]
    fn a_directory_of_another_user_is_refused_with_what_to_do() {
        if !may_chown() {
            return;
        }
        let base = tempfile::tempdir().expect("temp dir");
        let dir = base.path().join("theirs");
        std::fs::create_dir(&dir).expect("created");
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
        chmod(&dir, 0o700);
        let error = prepare(KEY, &dir).expect_err("refused");
        assert!(
            matches!(error.problem, Problem::Owner { owner: 65534, .. }),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.starts_with(KEY), "{message}");
        assert!(message.contains("subdirectory"), "{message}");
    }

    #[test]
    fn a_directory_of_ours_others_may_write_to_is_refused() {
        let base = tempfile::tempdir().expect("temp dir");
        let dir = base.path().join("shared");
        std::fs::create_dir(&dir).expect("created");
        chmod(&dir, 0o777);
        let error = prepare(KEY, &dir).expect_err("refused");
        assert!(
            matches!(error.problem, Problem::WritableByOthers { mode: 0o777 }),
            "{error}"
        );
        assert_eq!(mode(&dir), 0o777, "left for the operator to look at");
    }

    #[test]
    fn a_directory_of_ours_its_group_may_write_to_is_made_private_again() {
        // What the kubelet does to a volume's directories at each mount with
        // an fsGroup.
        let base = tempfile::tempdir().expect("temp dir");
        let dir = base.path().join("artifacts");
        std::fs::create_dir(&dir).expect("created");
        chmod(&dir, 0o2770);
        prepare(KEY, &dir).expect("made private");
        assert_eq!(mode(&dir), 0o2700);
        chmod(&dir, 0o755);
        prepare(KEY, &dir).expect("made private");
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_symbolic_link_or_a_file_in_place_of_the_directory_is_refused() {
        let base = tempfile::tempdir().expect("temp dir");
        let real = base.path().join("real");
        std::fs::create_dir(&real).expect("created");
        chmod(&real, 0o700);
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("linked");
        let dangling = base.path().join("dangling");
        std::os::unix::fs::symlink(base.path().join("nowhere"), &dangling).expect("linked");
        let file = base.path().join("file");
        std::fs::write(&file, b"").expect("written");
        for path in [link, dangling, file] {
            let error = prepare(KEY, &path).expect_err("refused");
            assert!(matches!(error.problem, Problem::NotADirectory), "{error}");
        }
        assert!(
            !base.path().join("nowhere").exists(),
            "nothing made through the link"
        );
    }

    #[test]
    fn a_directory_that_cannot_be_created_names_its_key() {
        let base = tempfile::tempdir().expect("temp dir");
        let file = base.path().join("file");
        std::fs::write(&file, b"").expect("written");
        let error = prepare("queue.spool_dir", &file.join("spool")).expect_err("refused");
        assert!(matches!(error.problem, Problem::Create(_)), "{error}");
        assert!(error.to_string().starts_with("queue.spool_dir "), "{error}");
    }
}
