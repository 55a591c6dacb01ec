//! TLS: certificates and keys from PEM files, served by rustls with the
//! ring provider (installed explicitly, once, in `main`). TLS 1.2 and 1.3
//! only, with rustls' cipher suites (AEAD only, forward secrecy only).
//!
//! Several certificates can be served, chosen by the client's SNI name;
//! the default one serves clients whose name matches none (or send none).
//! The files are checked every `tls.reload_interval` and, when they
//! change, loaded again without touching open connections (a rotation by
//! cert-manager needs no restart); a bad new file is logged and the
//! certificates in use are kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::IntCounterVec;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::{CertFiles, TlsSettings};

/// Why the TLS set-up failed; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("tls certificate {path}: {message}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key file could not be read or holds no private key.
    #[error("tls key {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (for example the key does not match).
    #[error("{cert} and {key} do not form a usable pair: {message}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The process-wide crypto provider. Installing it twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificates in use, swapped as a whole on reload.
#[derive(Debug)]
struct Certificates {
    default: Arc<CertifiedKey>,
    /// Chosen by SNI, in configuration order.
    by_name: Vec<Arc<CertifiedKey>>,
}

impl Certificates {
    /// The first SNI certificate valid for `name`, else the default.
    fn for_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.and_then(|n| ServerName::try_from(n.to_owned()).ok()) else {
            return self.default.clone();
        };
        self.by_name
            .iter()
            .find(|certified| {
                certified.end_entity_cert().is_ok_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
                })
            })
            .unwrap_or(&self.default)
            .clone()
    }
}

/// Serves the certificate for each handshake; reloadable.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<Certificates>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(current.for_name(client_hello.server_name()))
    }
}

/// The rustls configuration and the resolver behind it.
pub struct Tls {
    /// For the acceptor.
    pub config: Arc<ServerConfig>,
    /// For reloading.
    pub resolver: Arc<CertResolver>,
}

/// Build the server configuration: TLS 1.2 and 1.3, HTTP/1.1 only (for the
/// WebSocket upgrade), certificates from `settings`.
///
/// # Errors
/// A [`TlsError`] naming the file at fault.
pub fn server_config(settings: &TlsSettings) -> Result<Tls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(CertResolver {
        current: RwLock::new(Arc::new(load(settings, &provider)?)),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        config: Arc::new(config),
        resolver,
    })
}

fn load(settings: &TlsSettings, provider: &CryptoProvider) -> Result<Certificates, TlsError> {
    let default = Arc::new(certified(&settings.default, provider)?);
    let by_name = settings
        .sni
        .iter()
        .map(|files| certified(files, provider).map(Arc::new))
        .collect::<Result<_, _>>()?;
    Ok(Certificates { default, by_name })
}

fn certified(files: &CertFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    })
}

/// Every file the settings name, with its contents when last read.
fn snapshot(settings: &TlsSettings) -> Vec<Option<Vec<u8>>> {
    settings
        .files()
        .map(|path| std::fs::read(path).ok())
        .collect()
}

/// Check the files every `settings.reload_interval` until `stop`; load
/// them again when any changed. Counts outcomes in `reloads`.
pub async fn watch(
    settings: TlsSettings,
    resolver: Arc<CertResolver>,
    reloads: IntCounterVec,
    stop: CancellationToken,
) {
    let provider = rustls::crypto::ring::default_provider();
    let mut seen = snapshot(&settings);
    let mut tick = tokio::time::interval(settings.reload_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = snapshot(&settings);
        if now == seen {
            continue;
        }
        // A rotation writes the certificate and the key one after the
        // other: a pair that does not match yet is tried again next time.
        match load(&settings, &provider) {
            Ok(certificates) => {
                *resolver.current.write().unwrap_or_else(|e| e.into_inner()) =
                    Arc::new(certificates);
                seen = now;
                reloads.with_label_values(&["ok"]).inc();
                tracing::info!("TLS certificates reloaded; open connections keep theirs");
            }
            Err(e) => {
                reloads.with_label_values(&["error"]).inc();
                tracing::warn!(
                    "TLS files changed but cannot be used yet (keeping the current ones): {e}"
                );
            }
        }
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |message: String| TlsError::Cert {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no PEM certificate found".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_path_buf(),
        message: format!("{e} (expected a PEM private key: PKCS#8, PKCS#1 or SEC1)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str, names: &[&str]) -> CertFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn sni_picks_the_matching_certificate_and_falls_back_to_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let settings = TlsSettings {
            default: write_pair(dir.path(), "default", &["localhost"]),
            sni: vec![
                write_pair(dir.path(), "api", &["api.example.com"]),
                write_pair(dir.path(), "wild", &["*.example.org"]),
            ],
            reload_interval: Duration::from_secs(1),
        };
        let provider = rustls::crypto::ring::default_provider();
        let certificates = load(&settings, &provider).unwrap();
        let leaf = |name: Option<&str>| certificates.for_name(name).cert[0].clone();
        assert_eq!(
            leaf(Some("api.example.com")),
            certificates.by_name[0].cert[0]
        );
        assert_eq!(
            leaf(Some("chat.example.org")),
            certificates.by_name[1].cert[0]
        );
        assert_eq!(leaf(Some("example.org")), certificates.default.cert[0]);
        assert_eq!(leaf(Some("other.test")), certificates.default.cert[0]);
        assert_eq!(leaf(None), certificates.default.cert[0]);
    }

    #[test]
    fn a_key_that_does_not_match_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a", &["localhost"]);
        let b = write_pair(dir.path(), "b", &["localhost"]);
        let settings = TlsSettings {
            default: CertFiles {
                cert: a.cert.clone(),
                key: b.key.clone(),
            },
            sni: Vec::new(),
            reload_interval: Duration::from_secs(1),
        };
        let error = server_config(&settings).err().unwrap().to_string();
        assert!(
            error.contains("a.crt") && error.contains("b.key"),
            "{error}"
        );
    }
}
