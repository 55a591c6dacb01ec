//! Authentication on connect: JWT validation (HS256 with a shared secret,
//! RS256 with PEM public keys or a JWKS file; `exp`, `nbf`, `aud` and `iss`
//! checked) of a token sent in a header or the query string. Its claims go
//! to the function. An authorizer function (see the handshake) is the
//! alternative, or a second step.
//!
//! A token with a `kid` is checked with the key of that `kid` alone (a
//! JWKS key, or a PEM key configured with one); a token without one with
//! every RS256 key. A JWKS key the gateway cannot use (another algorithm or
//! key type, an encryption key, a malformed key) is skipped and logged, not
//! fatal to the whole set.
//!
//! The JWKS file is checked every `auth.jwt.jwks_reload_interval` and, when
//! it changes, its keys replace the ones in use (an identity provider's key
//! rotation needs no restart; connections already open are not affected).
//! A new file that cannot be used is logged and the keys in use are kept.
//!
//! A verified token says until when it is accepted ([`Verified`]), so that
//! its connection can be closed (1008) when it expires
//! (`auth.jwt.close_on_expiry`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::config::{JwtSettings, TokenSource};

/// Why the JWT set-up failed; each names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct AuthConfigError {
    /// The configuration key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn config_error(key: &str, message: impl Into<String>) -> AuthConfigError {
    AuthConfigError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Validates tokens with the configured keys.
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    /// The PEM files' and the JWKS file's RS256 keys, replaced whole when
    /// the JWKS file changes.
    rs256: SharedKeys,
    /// The PEM files' keys, which a JWKS reload keeps.
    pem: Arc<[NamedKey]>,
    /// The JWKS file, when configured, for its reload task.
    jwks: Option<JwksFile>,
    audience: Vec<String>,
    issuer: Vec<String>,
    leeway: Duration,
    close_on_expiry: bool,
}

/// A token that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Its claims, flattened to strings (JSON for values that are not
    /// strings).
    pub claims: Vec<(String, String)>,
    /// Until when the token is accepted, as time since the Unix epoch: its
    /// `exp` plus `auth.jwt.leeway`, the bound the check at connect uses.
    pub valid_until: Duration,
}

impl Verified {
    /// The moment the token stops being accepted, on the monotonic clock
    /// (now, when that has passed); `None` when it is too far ahead to
    /// represent, which in practice means never.
    pub fn deadline(&self) -> Option<Instant> {
        // Before the epoch the clock is wrong; then the whole remaining
        // validity is counted from now.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Instant::now().checked_add(self.valid_until.saturating_sub(now))
    }
}

impl JwtVerifier {
    /// Load the keys.
    ///
    /// # Errors
    /// An [`AuthConfigError`] naming the key whose file is unreadable or
    /// holds no usable key.
    pub fn new(settings: &JwtSettings) -> Result<Self, AuthConfigError> {
        let hs256 = settings
            .hs256_secret
            .as_ref()
            .map(|secret| DecodingKey::from_secret(secret.as_bytes()));
        let mut pem = Vec::with_capacity(settings.rs256_public_keys.len());
        for entry in &settings.rs256_public_keys {
            let text = read("auth.jwt.rs256_public_keys", &entry.file)?;
            let key = DecodingKey::from_rsa_pem(&text).map_err(|e| {
                config_error(
                    "auth.jwt.rs256_public_keys",
                    format!(
                        "{}: not an RSA public key in PEM: {e}",
                        entry.file.display()
                    ),
                )
            })?;
            pem.push(NamedKey {
                kid: entry.kid.clone(),
                key,
            });
        }
        let mut jwks_keys = Vec::new();
        let mut jwks = None;
        if let Some(path) = &settings.jwks_file {
            let text = read("auth.jwt.jwks_file", path)?;
            let set = parse_jwks(&text, &pem).map_err(|message| {
                config_error(
                    "auth.jwt.jwks_file",
                    format!("{}: {message}", path.display()),
                )
            })?;
            set.log_skipped(path);
            jwks_keys = set.keys;
            jwks = Some(JwksFile {
                path: path.clone(),
                interval: settings.jwks_reload_interval,
                loaded: text,
            });
        }
        Ok(Self {
            hs256,
            rs256: Arc::new(RwLock::new(Arc::new(Rs256Keys::new(&pem, &jwks_keys)))),
            pem: pem.into(),
            jwks,
            audience: settings.audience.clone(),
            issuer: settings.issuer.clone(),
            leeway: settings.leeway,
            close_on_expiry: settings.close_on_expiry,
        })
    }

    /// Whether a connection is closed (1008) when its token expires
    /// (`auth.jwt.close_on_expiry`).
    pub fn close_on_expiry(&self) -> bool {
        self.close_on_expiry
    }

    /// The task that reloads the JWKS file into this verifier when the file
    /// changes; `None` without `auth.jwt.jwks_file`.
    pub fn jwks_watch(&self) -> Option<JwksWatch> {
        self.jwks.as_ref().map(|file| JwksWatch {
            path: file.path.clone(),
            interval: file.interval,
            seen: Some(file.loaded.clone()),
            pem: self.pem.clone(),
            keys: self.rs256.clone(),
        })
    }

    /// Validate `token`; its claims and until when it is accepted.
    ///
    /// # Errors
    /// Why the token is not accepted, fit to send to the client.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        // The keys as they are now; a reload during this check does not
        // change them under it.
        let rs256 = self
            .rs256
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let keys: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => self.hs256.iter().collect(),
            // A kid names one key; a token without one may be signed by
            // any of them.
            Algorithm::RS256 => match &header.kid {
                Some(kid) => match rs256.by_kid.get(kid) {
                    Some(key) => vec![key],
                    None => return Err(format!("unknown key id {kid:?}")),
                },
                None => rs256.all.iter().collect(),
            },
            other => return Err(format!("algorithm {other:?} is not accepted")),
        };
        if keys.is_empty() {
            return Err(format!("no key is configured for {:?}", header.alg));
        }
        let mut validation = Validation::new(header.alg);
        let leeway = self.leeway.as_secs();
        validation.leeway = leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audience);
        }
        if !self.issuer.is_empty() {
            validation.set_issuer(&self.issuer);
        }
        let mut last_error = None;
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                key,
                &validation,
            ) {
                Ok(data) => {
                    // Validation has parsed `exp` as a whole number of
                    // seconds, as it is required.
                    let Some(exp) = data.claims.get("exp").and_then(serde_json::Value::as_u64)
                    else {
                        return Err("the token has no exp claim".into());
                    };
                    return Ok(Verified {
                        valid_until: Duration::from_secs(exp.saturating_add(leeway)),
                        claims: flatten(data.claims),
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(match last_error.map(|e| e.into_kind()) {
            Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                "the token has expired".into()
            }
            Some(jsonwebtoken::errors::ErrorKind::ImmatureSignature) => {
                "the token is not valid yet (nbf)".into()
            }
            Some(jsonwebtoken::errors::ErrorKind::InvalidAudience) => {
                "the token is not meant for this audience (aud)".into()
            }
            Some(jsonwebtoken::errors::ErrorKind::InvalidIssuer) => {
                "the token's issuer is not accepted (iss)".into()
            }
            Some(jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                "the token's signature does not verify".into()
            }
            Some(jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim)) => {
                format!("the token has no {claim} claim")
            }
            Some(other) => format!("invalid token: {other:?}"),
            None => "invalid token".into(),
        })
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, AuthConfigError> {
    std::fs::read(path).map_err(|e| config_error(key, format!("{}: {e}", path.display())))
}

/// The RS256 keys in use, shared by the verifier and the JWKS reload
/// task; a reload swaps the whole set.
type SharedKeys = Arc<RwLock<Arc<Rs256Keys>>>;

/// The configured JWKS file.
struct JwksFile {
    path: PathBuf,
    /// How often it is checked (`auth.jwt.jwks_reload_interval`).
    interval: Duration,
    /// Its contents when the keys in use were read from it.
    loaded: Vec<u8>,
}

/// Reloads the JWKS file into a [`JwtVerifier`] when the file changes.
pub struct JwksWatch {
    path: PathBuf,
    interval: Duration,
    /// The contents last read (`None`: the file could not be read), so
    /// that each change is loaded, and each failure reported, once.
    seen: Option<Vec<u8>>,
    pem: Arc<[NamedKey]>,
    keys: SharedKeys,
}

impl JwksWatch {
    /// Check the file every interval until `stop`; when its contents
    /// change, its keys (with the PEM keys) replace the ones in use. A
    /// file that cannot be read or holds no usable key keeps the keys in
    /// use and is logged. Counts outcomes in `reloads` (`ok`, `error`).
    pub async fn run(mut self, reloads: IntCounterVec, stop: CancellationToken) {
        // A zero interval would make tokio's timer panic; the
        // configuration refuses one, a hand-built settings value may not.
        let mut tick = tokio::time::interval(self.interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(outcome) = self.check().await else {
                continue;
            };
            match outcome {
                Ok(count) => {
                    reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(
                        file = %self.path.display(),
                        keys = count,
                        "auth.jwt.jwks_file reloaded; open connections are not affected"
                    );
                }
                Err(message) => {
                    reloads.with_label_values(&["error"]).inc();
                    tracing::warn!(
                        file = %self.path.display(),
                        "auth.jwt.jwks_file changed but cannot be used (keeping the keys in use): {message}"
                    );
                }
            }
        }
    }

    /// Read the file; `None` when it has not changed since last time, else
    /// whether its keys are now in use (how many) or why not. Unlike the
    /// TLS pair, the document is one file: a bad version is not tried
    /// again until it changes, so it is reported once.
    async fn check(&mut self) -> Option<Result<usize, String>> {
        let text = match tokio::fs::read(&self.path).await {
            Ok(text) if self.seen.as_ref() == Some(&text) => return None,
            Ok(text) => text,
            Err(_) if self.seen.is_none() => return None,
            Err(e) => {
                self.seen = None;
                return Some(Err(format!("cannot read it: {e}")));
            }
        };
        let parsed = parse_jwks(&text, &self.pem);
        self.seen = Some(text);
        let set = match parsed {
            Ok(set) => set,
            Err(message) => return Some(Err(message)),
        };
        set.log_skipped(&self.path);
        let keys = Arc::new(Rs256Keys::new(&self.pem, &set.keys));
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
        Some(Ok(set.keys.len()))
    }
}

/// An RS256 key and the `kid` tokens name it by, if any.
#[derive(Clone)]
struct NamedKey {
    kid: Option<String>,
    key: DecodingKey,
}

/// RS256 keys, as tokens choose them.
struct Rs256Keys {
    /// The keys that have a `kid`, for tokens that name one.
    by_kid: HashMap<String, DecodingKey>,
    /// Every key, for tokens without a `kid`.
    all: Vec<DecodingKey>,
}

impl Rs256Keys {
    /// The PEM keys, then the JWKS keys; their kids are distinct (checked
    /// in the configuration and by [`parse_jwks`]).
    fn new(pem: &[NamedKey], jwks: &[NamedKey]) -> Self {
        let mut keys = Self {
            by_kid: HashMap::new(),
            all: Vec::with_capacity(pem.len() + jwks.len()),
        };
        for named in pem.iter().chain(jwks) {
            if let Some(kid) = &named.kid {
                keys.by_kid
                    .entry(kid.clone())
                    .or_insert_with(|| named.key.clone());
            }
            keys.all.push(named.key.clone());
        }
        keys
    }
}

/// A key of a JWKS document that is not used, and why.
#[derive(Debug, PartialEq, Eq)]
struct Skipped {
    kid: Option<String>,
    reason: String,
    /// The key looked meant for this gateway (RSA, RS256, for signatures)
    /// but is unusable: worth a warning, where a key for another algorithm
    /// or for encryption is a normal part of a provider's set.
    broken: bool,
}

/// What a JWKS document gives: its usable RS256 keys and the rest.
struct JwksKeys {
    keys: Vec<NamedKey>,
    skipped: Vec<Skipped>,
}

impl JwksKeys {
    fn log_skipped(&self, path: &Path) {
        for skipped in &self.skipped {
            if skipped.broken {
                tracing::warn!(
                    file = %path.display(),
                    kid = ?skipped.kid,
                    "auth.jwt.jwks_file: key skipped: {}",
                    skipped.reason
                );
            } else {
                tracing::info!(
                    file = %path.display(),
                    kid = ?skipped.kid,
                    "auth.jwt.jwks_file: key skipped: {}",
                    skipped.reason
                );
            }
        }
    }
}

/// The RS256 keys of a JWKS document. Each other key (another algorithm
/// or key type, an encryption key, a malformed one, a `kid` already taken
/// by a `pem` key or an earlier key of the set) is skipped with its
/// reason, so that one key the gateway cannot use does not make it refuse
/// the whole set.
///
/// # Errors
/// When the text is not a JWKS document or holds no usable key.
fn parse_jwks(text: &[u8], pem: &[NamedKey]) -> Result<JwksKeys, String> {
    /// Only the envelope is parsed as a whole; each key is parsed alone.
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document =
        serde_json::from_slice(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = JwksKeys {
        keys: Vec::new(),
        skipped: Vec::new(),
    };
    for entry in &document.keys {
        let kid = entry
            .get("kid")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let repeated = kid.as_ref().is_some_and(|kid| {
            pem.iter()
                .chain(&set.keys)
                .any(|k| k.kid.as_ref() == Some(kid))
        });
        let outcome = if repeated {
            Err((
                "a PEM key or an earlier key of the set has the same kid".to_owned(),
                true,
            ))
        } else {
            rs256_key(entry)
        };
        match outcome {
            Ok(key) => set.keys.push(NamedKey { kid, key }),
            Err((reason, broken)) => set.skipped.push(Skipped {
                kid,
                reason,
                broken,
            }),
        }
    }
    if set.keys.is_empty() {
        return Err("no RS256 (RSA) key in the set".into());
    }
    Ok(set)
}

/// One JWKS entry as an RS256 key, or why not (and whether it looked
/// meant for RS256).
fn rs256_key(entry: &serde_json::Value) -> Result<DecodingKey, (String, bool)> {
    use serde_json::Value;
    let field = |name: &str| entry.get(name);
    match field("kty") {
        Some(Value::String(kty)) if kty == "RSA" => {}
        Some(kty) => {
            return Err((
                format!("key type {kty} is not supported (only RSA, for RS256)"),
                false,
            ));
        }
        None => return Err(("no key type (kty)".into(), true)),
    }
    match field("alg") {
        None => {}
        Some(Value::String(alg)) if alg == "RS256" => {}
        Some(alg) => {
            return Err((
                format!("algorithm {alg} is not supported (only RS256)"),
                false,
            ));
        }
    }
    match field("use") {
        None => {}
        Some(Value::String(usage)) if usage == "sig" => {}
        Some(usage) => return Err((format!("use {usage} is not for signatures"), false)),
    }
    let unusable = |e: &dyn std::fmt::Display| (format!("unusable RSA key: {e}"), true);
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|e| unusable(&e))?;
    DecodingKey::from_jwk(&jwk).map_err(|e| unusable(&e))
}

fn flatten(claims: serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    claims
        .into_iter()
        .map(|(name, value)| match value {
            serde_json::Value::String(text) => (name, text),
            other => (name, other.to_string()),
        })
        .collect()
}

// The settings type lives in config, which must not depend on auth; what
// it does with a request lives here.
impl TokenSource {
    /// The token from the header or, failing that, the query (whose token
    /// parameter is taken out).
    pub fn take(
        &self,
        headers: &tokio_tungstenite::tungstenite::http::HeaderMap,
        query: &mut Vec<(String, String)>,
    ) -> Option<String> {
        let from_header = headers
            .get(self.header.as_str())
            .and_then(|value| value.to_str().ok())
            .map(|value| {
                let value = value.trim();
                match value.get(..7) {
                    Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => value[7..].trim(),
                    _ => value,
                }
                .to_owned()
            });
        // Every copy of the parameter is taken out: the function never
        // sees a token, not even a second one.
        let mut from_query = None;
        query.retain(|(name, value)| {
            if *name != self.query {
                return true;
            }
            from_query.get_or_insert_with(|| value.clone());
            false
        });
        from_header.filter(|token| !token.is_empty()).or(from_query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PemKey;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

    #[test]
    fn every_copy_of_the_token_parameter_is_kept_from_the_function() {
        let source = TokenSource {
            header: "authorization".into(),
            query: "access_token".into(),
        };
        let mut query = vec![
            ("access_token".to_owned(), "first".to_owned()),
            ("room".to_owned(), "7".to_owned()),
            ("access_token".to_owned(), "second".to_owned()),
        ];
        let headers = tokio_tungstenite::tungstenite::http::HeaderMap::new();
        assert_eq!(source.take(&headers, &mut query).as_deref(), Some("first"));
        assert_eq!(query, vec![("room".to_owned(), "7".to_owned())]);
    }

    fn settings() -> JwtSettings {
        JwtSettings {
            hs256_secret: Some(SECRET.into()),
            rs256_public_keys: Vec::new(),
            jwks_file: None,
            jwks_reload_interval: JwtSettings::JWKS_RELOAD_INTERVAL,
            audience: vec!["tidegate".into()],
            issuer: vec!["https://issuer.example".into()],
            leeway: Duration::from_secs(0),
            close_on_expiry: true,
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn hs256(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn valid() -> serde_json::Value {
        json!({"sub": "ada", "aud": "tidegate", "iss": "https://issuer.example",
               "exp": now() + 60, "roles": ["admin"]})
    }

    #[test]
    fn a_valid_token_gives_its_claims_as_strings() {
        let verifier = JwtVerifier::new(&settings()).unwrap();
        let mut claims = verifier.verify(&hs256(valid())).unwrap().claims;
        claims.sort();
        assert!(claims.contains(&("sub".into(), "ada".into())));
        assert!(claims.contains(&("roles".into(), r#"["admin"]"#.into())));
    }

    #[test]
    fn a_verified_token_says_until_when_it_is_accepted() {
        let mut lenient = settings();
        lenient.leeway = Duration::from_secs(30);
        let verifier = JwtVerifier::new(&lenient).unwrap();
        let exp = now() + 120;
        let mut claims = valid();
        claims["exp"] = json!(exp);
        let verified = verifier.verify(&hs256(claims)).unwrap();
        // exp plus the leeway: the same bound the check at connect uses.
        assert_eq!(verified.valid_until, Duration::from_secs(exp as u64 + 30));
        let left = verified.deadline().unwrap() - Instant::now();
        assert!(
            left > Duration::from_secs(140) && left <= Duration::from_secs(150),
            "{left:?}"
        );
        // Accepted within the leeway after exp: its deadline is close, not
        // past.
        let mut claims = valid();
        claims["exp"] = json!(now() - 10);
        let verified = verifier.verify(&hs256(claims)).unwrap();
        let left = verified.deadline().unwrap() - Instant::now();
        assert!(left <= Duration::from_secs(20), "{left:?}");
        // An exp too far ahead for the clock never expires in practice.
        let mut claims = valid();
        claims["exp"] = json!(u64::MAX);
        let verified = verifier.verify(&hs256(claims)).unwrap();
        assert_eq!(verified.deadline(), None);
        assert!(verifier.close_on_expiry());
    }

    #[test]
    fn each_check_refuses_with_its_reason() {
        let verifier = JwtVerifier::new(&settings()).unwrap();
        let with = |key: &str, value: serde_json::Value| {
            let mut claims = valid();
            claims[key] = value;
            verifier.verify(&hs256(claims)).unwrap_err()
        };
        assert!(with("exp", json!(now() - 10)).contains("expired"));
        assert!(with("nbf", json!(now() + 60)).contains("nbf"));
        assert!(with("aud", json!("someone-else")).contains("aud"));
        assert!(with("iss", json!("https://evil.example")).contains("iss"));
        let mut no_exp = valid();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(verifier.verify(&hs256(no_exp)).unwrap_err().contains("exp"));
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &valid(),
            &EncodingKey::from_secret(b"another secret of enough length...."),
        )
        .unwrap();
        assert!(verifier.verify(&forged).unwrap_err().contains("signature"));
        assert!(verifier.verify("not.a.token").is_err());
        // alg "none" and others are never accepted.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZGEifQ.";
        assert!(verifier.verify(none).is_err());
        // An RS256 token with no RS256 key configured.
        let rs = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2ln";
        assert!(verifier.verify(rs).unwrap_err().contains("no key"));
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_query_which_loses_it() {
        use tokio_tungstenite::tungstenite::http::HeaderMap;
        let source = TokenSource {
            header: "authorization".into(),
            query: "access_token".into(),
        };
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        let mut query = vec![("room".to_owned(), "1".to_owned())];
        assert_eq!(source.take(&headers, &mut query).as_deref(), Some("abc"));
        let mut query = vec![
            ("access_token".to_owned(), "xyz".to_owned()),
            ("room".to_owned(), "1".to_owned()),
        ];
        assert_eq!(
            source.take(&HeaderMap::new(), &mut query).as_deref(),
            Some("xyz")
        );
        assert_eq!(query, vec![("room".to_owned(), "1".to_owned())]);
        assert_eq!(source.take(&HeaderMap::new(), &mut Vec::new()), None);
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/e2e/fixtures")
            .join(name)
    }

    /// An RS256 token signed with the test key pair's private key.
    fn rs256(claims: &serde_json::Value, kid: Option<&str>) -> String {
        rs256_with("jwt-test-rsa.key", claims, kid)
    }

    /// An RS256 token signed with the private key in fixture `key`.
    fn rs256_with(key: &str, claims: &serde_json::Value, kid: Option<&str>) -> String {
        let pem = std::fs::read(fixture(key)).unwrap();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
    }

    /// The test key pair's public key as a JWKS entry with this `kid`.
    fn jwk(kid: &str) -> serde_json::Value {
        let set: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("jwt-test-jwks.json")).unwrap()).unwrap();
        let mut key = set["keys"][0].clone();
        key["kid"] = json!(kid);
        key
    }

    #[test]
    fn jwks_keys_of_other_algorithms_or_types_are_skipped_with_their_kid() {
        let usable = jwk("test-1");
        let jwks = json!({"keys": [
            // Algorithms and curves the JWT library does not even parse.
            {"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "ec-512", "x": "AQ", "y": "AQ"},
            {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": "AQ"},
            // An encryption key, and a shared secret.
            {"kty": "RSA", "alg": "RSA-OAEP-256", "use": "enc", "kid": "oaep",
             "n": usable["n"], "e": usable["e"]},
            {"kty": "RSA", "use": "enc", "kid": "enc", "n": usable["n"], "e": usable["e"]},
            {"kty": "oct", "alg": "HS256", "kid": "oct", "k": "c2VjcmV0LXNlY3JldA"},
            // Meant for RS256 but malformed.
            {"kty": "RSA", "alg": "RS256", "kid": "broken", "n": "!!", "e": "AQAB"},
            usable,
            // A second key under a kid already taken.
            jwk("test-1"),
        ]});
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), jwks.to_string()).unwrap();
        let mut with_jwks = settings();
        with_jwks.jwks_file = Some(file.path().to_path_buf());
        with_jwks.audience = Vec::new();
        with_jwks.issuer = Vec::new();
        let verifier = JwtVerifier::new(&with_jwks).unwrap();
        let claims = json!({"sub": "lin", "exp": now() + 60});
        assert!(verifier.verify(&rs256(&claims, Some("test-1"))).is_ok());
        let error = verifier
            .verify(&rs256(&claims, Some("ec-512")))
            .unwrap_err();
        assert!(error.contains("ec-512"), "{error}");

        let set = parse_jwks(jwks.to_string().as_bytes(), &[]).unwrap();
        let skipped: Vec<(Option<&str>, bool)> = set
            .skipped
            .iter()
            .map(|s| (s.kid.as_deref(), s.broken))
            .collect();
        assert_eq!(
            skipped,
            [
                (Some("ec-512"), false),
                (Some("x25519"), false),
                (Some("oaep"), false),
                (Some("enc"), false),
                (Some("oct"), false),
                (Some("broken"), true),
                (Some("test-1"), true),
            ]
        );
        let reasons: Vec<&str> = set.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert!(reasons[0].contains("\"EC\""), "{reasons:?}");
        assert!(reasons[2].contains("\"RSA-OAEP-256\""), "{reasons:?}");
        assert!(reasons[3].contains("\"enc\""), "{reasons:?}");
        assert!(reasons[5].contains("unusable RSA key"), "{reasons:?}");
        assert!(reasons[6].contains("same kid"), "{reasons:?}");
    }

    #[test]
    fn pem_keys_are_chosen_by_kid_and_all_keys_are_tried_without_one() {
        let mut pem = settings();
        pem.hs256_secret = None;
        pem.rs256_public_keys = vec![
            PemKey {
                file: fixture("jwt-test-rsa.pub.pem"),
                kid: Some("one".into()),
            },
            PemKey {
                file: fixture("jwt-test-rsa-2.pub.pem"),
                kid: Some("two".into()),
            },
        ];
        let verifier = JwtVerifier::new(&pem).unwrap();
        let claims = valid();
        let first = |kid| rs256_with("jwt-test-rsa.key", &claims, kid);
        let second = |kid| rs256_with("jwt-test-rsa-2.key", &claims, kid);
        assert!(verifier.verify(&first(Some("one"))).is_ok());
        assert!(verifier.verify(&second(Some("two"))).is_ok());
        // The kid chooses the key: the other key's signature does not verify.
        let error = verifier.verify(&first(Some("two"))).unwrap_err();
        assert!(error.contains("signature"), "{error}");
        let error = verifier.verify(&second(Some("three"))).unwrap_err();
        assert!(error.contains("unknown key id"), "{error}");
        assert!(verifier.verify(&first(None)).is_ok());
        assert!(verifier.verify(&second(None)).is_ok());

        // Without a kid, the JWKS file's keys are tried too (they all have
        // one), and a JWKS key cannot take a PEM key's kid.
        let mut jwks = settings();
        jwks.hs256_secret = None;
        jwks.jwks_file = Some(fixture("jwt-test-jwks.json"));
        let verifier = JwtVerifier::new(&jwks).unwrap();
        assert!(verifier.verify(&first(None)).is_ok());
        let file = tempfile::NamedTempFile::new().unwrap();
        let set = json!({"keys": [jwk("test-1"), jwk("test-2")]});
        std::fs::write(file.path(), set.to_string()).unwrap();
        jwks.jwks_file = Some(file.path().to_path_buf());
        jwks.rs256_public_keys = vec![PemKey {
            file: fixture("jwt-test-rsa-2.pub.pem"),
            kid: Some("test-1".into()),
        }];
        let verifier = JwtVerifier::new(&jwks).unwrap();
        assert!(verifier.verify(&second(Some("test-1"))).is_ok());
        assert!(verifier.verify(&first(Some("test-1"))).is_err());
        assert!(verifier.verify(&first(Some("test-2"))).is_ok());
    }

    /// Wait (up to 10 s) until `reloads` counts `value` with `outcome`.
    async fn counted(reloads: &IntCounterVec, outcome: &str, value: u64) {
        let counter = reloads.with_label_values(&[outcome]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counter.get() != value {
            assert!(
                std::time::Instant::now() < deadline,
                "{outcome} reloads: {}, expected {value}",
                counter.get()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_changed_jwks_file_is_reloaded_and_a_bad_one_keeps_the_keys_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        // Written beside it and renamed into place, as a rotation should.
        let replace = |text: String| {
            let new = dir.path().join("jwks.json.new");
            std::fs::write(&new, text).unwrap();
            std::fs::rename(&new, &path).unwrap();
        };
        replace(json!({"keys": [jwk("old")]}).to_string());
        let mut with_jwks = settings();
        with_jwks.jwks_file = Some(path.clone());
        with_jwks.jwks_reload_interval = Duration::from_millis(10);
        let verifier = JwtVerifier::new(&with_jwks).unwrap();
        let reloads =
            IntCounterVec::new(prometheus::Opts::new("reloads", "test"), &["outcome"]).unwrap();
        let stop = CancellationToken::new();
        let watch = verifier.jwks_watch().expect("a JWKS file is configured");
        let task = tokio::spawn(watch.run(reloads.clone(), stop.clone()));
        let token = |kid| rs256(&valid(), Some(kid));
        assert!(verifier.verify(&token("old")).is_ok());
        assert!(verifier.verify(&token("new")).is_err());

        // Not JSON, then no usable key: each counted once, the keys stay.
        replace(r#"{"keys": ["#.into());
        counted(&reloads, "error", 1).await;
        replace(json!({"keys": [{"kty": "EC", "crv": "P-521", "kid": "new"}]}).to_string());
        counted(&reloads, "error", 2).await;
        assert!(verifier.verify(&token("old")).is_ok());
        assert_eq!(reloads.with_label_values(&["ok"]).get(), 0);

        // A usable file replaces the keys.
        replace(json!({"keys": [jwk("new")]}).to_string());
        counted(&reloads, "ok", 1).await;
        assert!(verifier.verify(&token("new")).is_ok());
        let error = verifier.verify(&token("old")).unwrap_err();
        assert!(error.contains("unknown key id"), "{error}");

        // A file gone is reported once; the keys in use stay.
        std::fs::remove_file(&path).unwrap();
        counted(&reloads, "error", 3).await;
        assert!(verifier.verify(&token("new")).is_ok());
        stop.cancel();
        task.await.unwrap();
        assert_eq!(reloads.with_label_values(&["error"]).get(), 3);
    }

    #[test]
    fn unreadable_or_keyless_files_name_their_key() {
        let mut bad = settings();
        bad.rs256_public_keys = vec![PemKey {
            file: "/nonexistent/key.pem".into(),
            kid: None,
        }];
        let error = JwtVerifier::new(&bad).err().unwrap().to_string();
        assert!(error.contains("auth.jwt.rs256_public_keys"), "{error}");
        let jwks = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(jwks.path(), r#"{"keys":[]}"#).unwrap();
        let mut empty = settings();
        empty.jwks_file = Some(jwks.path().to_path_buf());
        let error = JwtVerifier::new(&empty).err().unwrap().to_string();
        assert!(error.contains("auth.jwt.jwks_file"), "{error}");
    }
}
