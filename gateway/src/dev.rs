//! `--dev`: a self-signed certificate for localhost, so the gateway runs
//! without any set-up.

use std::path::Path;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use crate::config::CertFiles;

/// How long the development certificate is valid.
const VALIDITY_DAYS: i64 = 30;

/// A generated certificate: where it is and how to recognise it.
pub struct DevCertificate {
    /// The files, as the TLS set-up reads them.
    pub files: CertFiles,
    /// SHA-256 fingerprint of the certificate (DER), colon-separated hex.
    pub fingerprint: String,
}

/// Generate a self-signed certificate for `localhost`, `127.0.0.1` and
/// `::1`, valid for 30 days, and write it (and its key, mode 0600) to `dir`,
/// a private directory the caller prepared
/// ([`crate::state_dir::dev_certificate_dir`]).
///
/// # Errors
/// When the certificate cannot be generated or written.
pub fn generate_certificate(dir: &Path) -> anyhow::Result<DevCertificate> {
    use anyhow::Context;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Tidegate development certificate");
    params.distinguished_name = name;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;

    let cert_path = dir.join("dev-cert.pem");
    let key_path = dir.join("dev-key.pem");
    write_private(&cert_path, cert.pem().as_bytes())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    write_private(&key_path, key.serialize_pem().as_bytes())
        .with_context(|| format!("writing {}", key_path.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.der());
    let fingerprint = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(DevCertificate {
        files: CertFiles {
            cert: cert_path,
            key: key_path,
        },
        fingerprint,
    })
}

/// Write `bytes` to `path` (mode 0600) through a new file renamed into
/// place: a symbolic link planted at `path` is replaced, never written
/// through.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("pem.new");
    // A leftover from an interrupted start (or a planted link) goes first;
    // create_new with O_NOFOLLOW then refuses anything else in the way.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_link_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls).unwrap();
        std::os::unix::fs::symlink(&victim, tls.join("dev-key.pem")).unwrap();
        std::os::unix::fs::symlink(&victim, tls.join("dev-key.pem.new")).unwrap();
        let cert = generate_certificate(&tls).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        let key = std::fs::symlink_metadata(&cert.files.key).unwrap();
        assert!(key.is_file(), "the key is a file of its own");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
    }
}
