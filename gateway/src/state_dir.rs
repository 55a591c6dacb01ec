//! The state directory (`server.state_dir`): spool, precompiled artifacts
//! and the development certificate live under it, and the gateway loads
//! the artifacts as native code. So it must be the gateway user's own:
//! created 0700 when missing, owned by the user the gateway runs as, and
//! writable by no one else.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// It could not be created or inspected.
    #[error("server.state_dir {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// It is not a directory (a file, or a symbolic link).
    #[error("server.state_dir {0} is not a directory (symbolic links are not followed)")]
    NotADirectory(String),
    /// Someone else owns it.
    #[error(
        "server.state_dir {path} is owned by uid {owner}, not by uid {user} that tidegate runs as: \
         another user could plant files the gateway loads; use a directory of this user's own"
    )]
    Owner {
        /// The directory.
        path: String,
        /// Its owner.
        owner: u32,
        /// The gateway's effective user.
        user: u32,
    },
    /// Others may write to it.
    #[error(
        "server.state_dir {path} is writable by other users (mode {mode:o}): another user could \
         plant files the gateway loads; chmod go-w it or use another directory"
    )]
    Writable {
        /// The directory.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

/// Create `dir` (0700, with any missing parents) when it does not exist,
/// then check that it is a directory of the gateway's user that nobody
/// else can write to.
///
/// # Errors
/// A [`StateDirError`] naming the directory and what is wrong with it.
pub fn prepare(dir: &Path) -> Result<(), StateDirError> {
    let shown = dir.display().to_string();
    let io = |source| StateDirError::Io {
        path: shown.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    // Not followed: a link planted in place of the directory is refused.
    let meta = std::fs::symlink_metadata(dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory(shown));
    }
    let user = rustix::process::geteuid().as_raw();
    if meta.uid() != user {
        return Err(StateDirError::Owner {
            path: shown,
            owner: meta.uid(),
            user,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StateDirError::Writable { path: shown, mode });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_created_for_this_user_only() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b/state");
        prepare(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Twice is fine.
        prepare(&dir).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_to_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = prepare(&dir).unwrap_err();
        assert!(matches!(error, StateDirError::Writable { .. }), "{error}");
        assert!(error.to_string().contains("server.state_dir"), "{error}");
    }

    #[test]
    fn a_symbolic_link_in_place_of_the_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = base.path().join("state");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = prepare(&link).unwrap_err();
        assert!(matches!(error, StateDirError::NotADirectory(_)), "{error}");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: changing a directory's owner needs root");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("theirs");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = prepare(&dir).unwrap_err();
        assert!(
            matches!(error, StateDirError::Owner { owner: 65534, .. }),
            "{error}"
        );
    }
}
