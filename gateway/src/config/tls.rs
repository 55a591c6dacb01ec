//! `[tls]`: the certificate served by default, more certificates chosen by
//! the client's SNI name (`[[tls.sni]]`), and how often the files are
//! checked for changes. Required outside `--dev`, which generates a
//! self-signed certificate when none is configured.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, positive};

/// `[tls]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    /// `tls.cert`: the default certificate chain.
    cert: Option<PathBuf>,
    /// `tls.key`: the default certificate's key.
    key: Option<PathBuf>,
    /// `[[tls.sni]]`: further certificates.
    #[serde(default)]
    sni: Vec<RawCertFiles>,
    /// `tls.reload_interval`, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    reload_interval: Option<Duration>,
}

/// One `[[tls.sni]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertFiles {
    /// The certificate chain.
    cert: PathBuf,
    /// Its key.
    key: PathBuf,
}

/// One certificate chain and its key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificates, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Served when the client's SNI name matches no other certificate
    /// (`tls.cert`, `tls.key`).
    pub default: CertFiles,
    /// Served to clients whose SNI name they are valid for (`[[tls.sni]]`).
    pub sni: Vec<CertFiles>,
    /// How often the files are checked for changes (`tls.reload_interval`).
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// Default reload check interval.
    pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

    /// Every file named, certificates and keys.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(&self.default)
            .chain(&self.sni)
            .flat_map(|files| [files.cert.as_path(), files.key.as_path()])
    }
}

impl RawTls {
    /// The certificates; `None` only in `--dev` with no certificate
    /// configured at all.
    pub(super) fn validate(self, dev: bool) -> Result<Option<TlsSettings>, ConfigError> {
        let reload_interval = positive(
            "tls.reload_interval",
            self.reload_interval,
            TlsSettings::RELOAD_INTERVAL,
        )?;
        let sni: Vec<CertFiles> = self
            .sni
            .into_iter()
            .map(|files| CertFiles {
                cert: files.cert,
                key: files.key,
            })
            .collect();
        match (self.cert, self.key) {
            (Some(cert), Some(key)) => Ok(Some(TlsSettings {
                default: CertFiles { cert, key },
                sni,
                reload_interval,
            })),
            (None, None) if dev && !sni.is_empty() => Err(invalid(
                "tls.sni",
                "needs a default certificate too: set tls.cert and tls.key",
            )),
            (None, None) if dev => Ok(None),
            (None, None) => Err(invalid(
                "tls.cert",
                "a certificate is required: set tls.cert and tls.key (PEM files), \
                 or run with --dev for a self-signed one",
            )),
            (Some(_), None) => Err(invalid("tls.key", "tls.cert is set but tls.key is not")),
            (None, Some(_)) => Err(invalid("tls.cert", "tls.key is set but tls.cert is not")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::write;

    #[test]
    fn a_certificate_is_required_outside_dev_mode() {
        let file = write("[functions.echo]\nwasm = \"builtin:echo\"\n[routes]\n\"/\" = \"echo\"\n");
        let error = Settings::from_sources(Some(file.path()), vec![], false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls.cert") && error.contains("--dev"),
            "{error}"
        );
    }
}
