//! The state directory (`server.state_dir`): where the gateway's own
//! directories go unless configured elsewhere: `spool/`
//! (`queue.spool_dir`), `artifacts/` (`runtime.artifact_dir`) and, in
//! `--dev` without certificate files, `tls/`.
//!
//! The state directory itself is the operator's, often a volume's mount
//! root: `root:<fsGroup>` mode 2775 on a PersistentVolumeClaim with an
//! `fsGroup`, 0777 for an `emptyDir`. It is not checked, and nothing is
//! done to it unless something under it is used: then it is created with
//! that directory (0700, with its missing parents). So with the spool and
//! the artifacts configured elsewhere and TLS files given, a missing or
//! read-only state directory does not matter.
//!
//! The directories the gateway reads back are private to its user, each
//! checked where it is used with [`runtime::private_dir::prepare`], whose
//! documentation gives the policy and why parents need no check: the
//! artifacts before every write, the certificate directory here. (The
//! spool makes its directory private itself when it opens.)
//!
//! The `--dev` default (`~/.local/state/tidegate/dev/<port>`) is created
//! 0700 that way. An existing one is not checked either: nothing is read
//! back from it but through those private subdirectories, and it lies in
//! the user's home, where no other user can swap them.

use std::path::{Path, PathBuf};

use runtime::private_dir::{self, PrivateDirError};

/// The subdirectory of the state directory where `--dev` writes its
/// certificate.
pub const DEV_CERTIFICATE_DIR: &str = "tls";

/// The directory for the `--dev` certificate, `<state_dir>/tls`, created
/// private to the gateway's user (with the state directory, 0700, if that
/// is missing) and checked to be so.
///
/// # Errors
/// A [`PrivateDirError`] naming `server.state_dir` when the directory
/// cannot be created or is not private (see [`private_dir::prepare`]).
pub fn dev_certificate_dir(state_dir: &Path) -> Result<PathBuf, PrivateDirError> {
    let dir = state_dir.join(DEV_CERTIFICATE_DIR);
    private_dir::prepare("server.state_dir", &dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_missing_state_directory_is_created_0700_with_the_certificate_directory() {
        let base = tempfile::tempdir().unwrap();
        let state = base.path().join("a/state");
        let dir = dev_certificate_dir(&state).unwrap();
        assert_eq!(dir, state.join("tls"));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&state), 0o700);
        // Twice is fine.
        dev_certificate_dir(&state).unwrap();
    }

    #[test]
    fn a_state_directory_others_can_write_to_gets_a_private_certificate_directory() {
        let base = tempfile::tempdir().unwrap();
        let state = base.path().join("shared");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let dir = dev_certificate_dir(&state).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            mode(&state),
            0o777,
            "the operator's directory is left alone"
        );
    }

    #[test]
    fn a_symbolic_link_in_place_of_the_certificate_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let elsewhere = base.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, base.path().join("tls")).unwrap();
        let error = dev_certificate_dir(base.path()).unwrap_err();
        assert!(
            matches!(error.problem, private_dir::Problem::NotADirectory),
            "{error}"
        );
        assert!(
            error.to_string().starts_with("server.state_dir "),
            "{error}"
        );
    }

    #[test]
    fn a_certificate_directory_of_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            println!("skipped: changing a directory's owner needs root");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("tls");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = dev_certificate_dir(base.path()).unwrap_err();
        assert!(
            matches!(
                error.problem,
                private_dir::Problem::Owner { owner: 65534, .. }
            ),
            "{error}"
        );
    }
}
