//! `--dev`: a self-signed certificate for localhost, so the gateway runs
//! without any set-up.

use std::path::Path;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use crate::tls::CertFiles;

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
/// `::1`, valid for 30 days, and write it (and its key, mode 0600) to `dir`.
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

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert_path = dir.join("dev-cert.pem");
    let key_path = dir.join("dev-key.pem");
    std::fs::write(&cert_path, cert.pem())
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

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}
