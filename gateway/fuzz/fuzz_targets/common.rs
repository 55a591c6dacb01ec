//! What the upgrade and JWT targets share: a verifier with every kind of
//! key the gateway accepts.

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use gateway::auth::JwtVerifier;
use gateway::config::{JwtSettings, PemKey};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/e2e/fixtures")
        .join(name)
}

/// HS256, an RS256 PEM key and a JWKS file.
pub static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    JwtVerifier::new(&JwtSettings {
        hs256_secret: Some("a-fuzzing-secret-of-at-least-32-bytes".into()),
        rs256_public_keys: vec![PemKey {
            file: fixture("jwt-test-rsa.pub.pem"),
            kid: Some("pem-1".into()),
        }],
        jwks_file: Some(fixture("jwt-test-jwks.json")),
        jwks_reload_interval: JwtSettings::JWKS_RELOAD_INTERVAL,
        audience: vec!["tidegate".into()],
        issuer: vec!["https://id.example".into()],
        leeway: Duration::from_secs(30),
        close_on_expiry: true,
    })
    .expect("fuzzing keys")
});
