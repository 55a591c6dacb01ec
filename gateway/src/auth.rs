//! Authentication on connect: JWT validation (HS256 with a shared secret,
//! RS256 with PEM public keys or a JWKS file; `exp`, `nbf`, `aud` and `iss`
//! checked) of a token sent in a header or the query string. Its claims go
//! to the function. An authorizer function (see the handshake) is the
//! alternative, or a second step.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

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
    /// RS256 keys by `kid` (JWKS keys that have one).
    rs256_by_kid: HashMap<String, DecodingKey>,
    /// RS256 keys without a `kid`: PEM files and JWKS keys without one.
    rs256: Vec<DecodingKey>,
    audience: Vec<String>,
    issuer: Vec<String>,
    leeway: Duration,
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
        let mut rs256 = Vec::new();
        for path in &settings.rs256_public_keys {
            let pem = read("auth.jwt.rs256_public_keys", path)?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                config_error(
                    "auth.jwt.rs256_public_keys",
                    format!("{}: not an RSA public key in PEM: {e}", path.display()),
                )
            })?;
            rs256.push(key);
        }
        let mut rs256_by_kid = HashMap::new();
        if let Some(path) = &settings.jwks_file {
            let text = read("auth.jwt.jwks_file", path)?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
                config_error(
                    "auth.jwt.jwks_file",
                    format!("{}: not a JWKS document: {e}", path.display()),
                )
            })?;
            let mut usable = 0;
            for jwk in &set.keys {
                // Only RSA keys for RS256 (or with no `alg`) are used.
                let rsa = matches!(
                    jwk.algorithm,
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
                );
                let alg_ok = jwk
                    .common
                    .key_algorithm
                    .is_none_or(|alg| alg == jsonwebtoken::jwk::KeyAlgorithm::RS256);
                if !rsa || !alg_ok {
                    continue;
                }
                let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                    config_error(
                        "auth.jwt.jwks_file",
                        format!("{}: unusable key: {e}", path.display()),
                    )
                })?;
                usable += 1;
                match &jwk.common.key_id {
                    Some(kid) => {
                        rs256_by_kid.insert(kid.clone(), key);
                    }
                    None => rs256.push(key),
                }
            }
            if usable == 0 {
                return Err(config_error(
                    "auth.jwt.jwks_file",
                    format!("{}: no RS256 (RSA) key in the set", path.display()),
                ));
            }
        }
        Ok(Self {
            hs256,
            rs256_by_kid,
            rs256,
            audience: settings.audience.clone(),
            issuer: settings.issuer.clone(),
            leeway: settings.leeway,
        })
    }

    /// Validate `token`; its claims, flattened to strings (JSON for values
    /// that are not strings).
    ///
    /// # Errors
    /// Why the token is not accepted, fit to send to the client.
    pub fn verify(&self, token: &str) -> Result<Vec<(String, String)>, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let keys: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => self.hs256.iter().collect(),
            Algorithm::RS256 => match &header.kid {
                Some(kid) => match self.rs256_by_kid.get(kid) {
                    Some(key) => vec![key],
                    None => return Err(format!("unknown key id {kid:?}")),
                },
                None => self.rs256.iter().collect(),
            },
            other => return Err(format!("algorithm {other:?} is not accepted")),
        };
        if keys.is_empty() {
            return Err(format!("no key is configured for {:?}", header.alg));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway.as_secs();
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
                Ok(data) => return Ok(flatten(data.claims)),
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
        let position = query.iter().position(|(name, _)| *name == self.query);
        let from_query = position.map(|i| query.remove(i).1);
        from_header.filter(|token| !token.is_empty()).or(from_query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

    fn settings() -> JwtSettings {
        JwtSettings {
            hs256_secret: Some(SECRET.into()),
            rs256_public_keys: Vec::new(),
            jwks_file: None,
            audience: vec!["tidegate".into()],
            issuer: vec!["https://issuer.example".into()],
            leeway: Duration::from_secs(0),
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
        let mut claims = verifier.verify(&hs256(valid())).unwrap();
        claims.sort();
        assert!(claims.contains(&("sub".into(), "ada".into())));
        assert!(claims.contains(&("roles".into(), r#"["admin"]"#.into())));
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

    #[test]
    fn unreadable_or_keyless_files_name_their_key() {
        let mut bad = settings();
        bad.rs256_public_keys = vec![std::path::PathBuf::from("/nonexistent/key.pem")];
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
