//! `[auth]`: authentication on connect: where a client's token is, JWT
//! validation (`[auth.jwt]`), and an authorizer function (checked against
//! `[functions]` in the parent module). Neither by default.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid, positive};

/// `[auth]` as written; `None` takes the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    /// `auth.token_header`: a header name.
    token_header: Option<String>,
    /// `auth.token_query`: a query parameter.
    token_query: Option<String>,
    /// `auth.authorizer`: a function name.
    authorizer: Option<String>,
    /// `[auth.jwt]`.
    jwt: Option<RawJwt>,
}

/// `[auth.jwt]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    /// `auth.jwt.hs256_secret`.
    hs256_secret: Option<String>,
    /// `auth.jwt.rs256_public_keys`.
    rs256_public_keys: Option<Vec<RawPemKey>>,
    /// `auth.jwt.jwks_file`.
    jwks_file: Option<PathBuf>,
    /// `auth.jwt.jwks_reload_interval`, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    jwks_reload_interval: Option<Duration>,
    /// `auth.jwt.audience`: accepted `aud` values.
    audience: Option<Vec<String>>,
    /// `auth.jwt.issuer`: accepted `iss` values.
    issuer: Option<Vec<String>>,
    /// `auth.jwt.leeway`, e.g. `30s`.
    #[serde(default, with = "humantime_serde")]
    leeway: Option<Duration>,
    /// `auth.jwt.close_on_expiry`.
    close_on_expiry: Option<bool>,
}

/// An entry of `auth.jwt.rs256_public_keys`: a path, as it always was, or a
/// table that also names the key's `kid`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPemKey {
    /// `"key.pem"`.
    File(PathBuf),
    /// `{ file = "key.pem", kid = "..." }`.
    Named(RawNamedPemKey),
}

/// `{ file = "key.pem", kid = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamedPemKey {
    /// The PEM file.
    file: PathBuf,
    /// The key id tokens signed with it carry.
    kid: Option<String>,
}

/// Authentication on connect: JWT validation, an authorizer function, or
/// both (JWT first); neither by default.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Where the token is (`auth.token_header`, `auth.token_query`).
    pub token: TokenSource,
    /// A function whose `on-connect` admits or refuses every client before
    /// the route's function (`auth.authorizer`).
    pub authorizer: Option<String>,
    /// JWT validation (`[auth.jwt]`), when any key is configured.
    pub jwt: Option<JwtSettings>,
}

/// Where a client's token is, as configured (the auth module reads it from
/// the request).
#[derive(Debug, Clone)]
pub struct TokenSource {
    /// Request header (lower case); for `authorization`, the `Bearer `
    /// scheme is stripped.
    pub header: String,
    /// Query-string parameter, for browsers (which cannot set headers on a
    /// WebSocket). Removed from the query the function sees.
    pub query: String,
}

impl TokenSource {
    /// Default of `auth.token_header`.
    pub const HEADER: &str = "authorization";
    /// Default of `auth.token_query`.
    pub const QUERY: &str = "access_token";
}

/// JWT validation keys and checks. Its `Debug` shows no secret.
#[derive(Clone)]
pub struct JwtSettings {
    /// HS256 shared secret (`auth.jwt.hs256_secret`), at least 32 bytes.
    pub hs256_secret: Option<String>,
    /// RS256 public keys, PEM files (`auth.jwt.rs256_public_keys`), each
    /// with the `kid` tokens signed by it carry, if any.
    pub rs256_public_keys: Vec<PemKey>,
    /// A JWKS document with RS256 keys, chosen by `kid`
    /// (`auth.jwt.jwks_file`).
    pub jwks_file: Option<PathBuf>,
    /// How often the JWKS file is checked for changes, which are loaded
    /// without a restart (`auth.jwt.jwks_reload_interval`).
    pub jwks_reload_interval: Duration,
    /// Accepted `aud` values; empty: `aud` is not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty: `iss` is not checked.
    pub issuer: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Whether a connection is closed with 1008 when its token expires
    /// (`exp` plus the leeway), so access ends with the token's life
    /// (`auth.jwt.close_on_expiry`, true by default).
    pub close_on_expiry: bool,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Named field by field, so a new one is not forgotten here.
        let Self {
            hs256_secret,
            rs256_public_keys,
            jwks_file,
            jwks_reload_interval,
            audience,
            issuer,
            leeway,
            close_on_expiry,
        } = self;
        f.debug_struct("JwtSettings")
            .field(
                "hs256_secret",
                &hs256_secret.as_ref().map(|_| super::REDACTED),
            )
            .field("rs256_public_keys", rs256_public_keys)
            .field("jwks_file", jwks_file)
            .field("jwks_reload_interval", jwks_reload_interval)
            .field("audience", audience)
            .field("issuer", issuer)
            .field("leeway", leeway)
            .field("close_on_expiry", close_on_expiry)
            .finish()
    }
}

impl JwtSettings {
    /// Shortest `auth.jwt.hs256_secret`, in bytes: 256 bits.
    pub const MIN_HS256_SECRET_LEN: usize = 32;
    /// Default of `auth.jwt.jwks_reload_interval`, as for the TLS files.
    pub const JWKS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
    /// Default of `auth.jwt.leeway`.
    pub const LEEWAY: Duration = Duration::from_secs(30);
    /// Default of `auth.jwt.close_on_expiry`.
    pub const CLOSE_ON_EXPIRY: bool = true;
}

/// An RS256 public key file (`auth.jwt.rs256_public_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemKey {
    /// The PEM file holding the RSA public key.
    pub file: PathBuf,
    /// The key id tokens signed with this key name in their header, so a
    /// token with a `kid` is checked with its key alone; `None`: the key is
    /// tried only for tokens without a `kid`. Unique among the PEM keys.
    pub kid: Option<String>,
}

impl RawAuth {
    /// The authentication settings; `auth.authorizer` is checked against
    /// the functions by the caller.
    pub(super) fn validate(self) -> Result<AuthSettings, ConfigError> {
        let token = TokenSource {
            header: self
                .token_header
                .unwrap_or_else(|| TokenSource::HEADER.into())
                .trim()
                .to_ascii_lowercase(),
            query: self
                .token_query
                .unwrap_or_else(|| TokenSource::QUERY.into()),
        };
        if tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(token.header.as_bytes())
            .is_err()
        {
            return Err(invalid(
                "auth.token_header",
                format!("{:?} is not a header name", token.header),
            ));
        }
        if token.query.is_empty() {
            return Err(invalid("auth.token_query", "must not be empty"));
        }
        let jwt = self.jwt.map(RawJwt::validate).transpose()?;
        Ok(AuthSettings {
            token,
            authorizer: self.authorizer,
            jwt,
        })
    }
}

impl RawJwt {
    /// The JWT settings; at least one key source is required.
    fn validate(self) -> Result<JwtSettings, ConfigError> {
        if let Some(secret) = &self.hs256_secret
            && secret.len() < JwtSettings::MIN_HS256_SECRET_LEN
        {
            return Err(invalid(
                "auth.jwt.hs256_secret",
                format!(
                    "must be at least {} bytes (256 bits) of random text",
                    JwtSettings::MIN_HS256_SECRET_LEN
                ),
            ));
        }
        let settings = JwtSettings {
            hs256_secret: self.hs256_secret,
            rs256_public_keys: pem_keys(self.rs256_public_keys.unwrap_or_default())?,
            jwks_file: self.jwks_file,
            jwks_reload_interval: positive(
                "auth.jwt.jwks_reload_interval",
                self.jwks_reload_interval,
                JwtSettings::JWKS_RELOAD_INTERVAL,
            )?,
            audience: self.audience.unwrap_or_default(),
            issuer: self.issuer.unwrap_or_default(),
            leeway: self.leeway.unwrap_or(JwtSettings::LEEWAY),
            close_on_expiry: self.close_on_expiry.unwrap_or(JwtSettings::CLOSE_ON_EXPIRY),
        };
        if settings.hs256_secret.is_none()
            && settings.rs256_public_keys.is_empty()
            && settings.jwks_file.is_none()
        {
            return Err(invalid(
                "auth.jwt",
                "no key: set hs256_secret, rs256_public_keys or jwks_file",
            ));
        }
        Ok(settings)
    }
}

/// The PEM key entries, checked: a `kid` is not empty and names one key.
fn pem_keys(raw: Vec<RawPemKey>) -> Result<Vec<PemKey>, ConfigError> {
    const KEY: &str = "auth.jwt.rs256_public_keys";
    let mut keys: Vec<PemKey> = Vec::with_capacity(raw.len());
    for entry in raw {
        let key = match entry {
            RawPemKey::File(file) => PemKey { file, kid: None },
            RawPemKey::Named(named) => PemKey {
                file: named.file,
                kid: named.kid,
            },
        };
        if let Some(kid) = &key.kid {
            if kid.is_empty() {
                return Err(invalid(
                    KEY,
                    format!("{}: kid must not be empty", key.file.display()),
                ));
            }
            if let Some(other) = keys.iter().find(|k| k.kid.as_ref() == Some(kid)) {
                return Err(invalid(
                    KEY,
                    format!(
                        "kid {kid:?} is given to both {} and {}",
                        other.file.display(),
                        key.file.display()
                    ),
                ));
            }
        }
        keys.push(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::{MINIMAL, write};
    use super::*;

    #[test]
    fn pem_keys_are_paths_or_tables_with_a_kid() {
        let jwt = |keys: &str| {
            let file = write(&format!(
                "{MINIMAL}\n[auth.jwt]\nrs256_public_keys = {keys}\n"
            ));
            Settings::from_sources(Some(file.path()), vec![], false)
                .map(|settings| settings.auth.jwt.unwrap().rs256_public_keys)
        };
        let pem = |file: &str, kid: Option<&str>| PemKey {
            file: PathBuf::from(file),
            kid: kid.map(str::to_owned),
        };
        assert_eq!(
            jwt(r#"["a.pem", { file = "b.pem", kid = "2025-06" }, { file = "c.pem" }]"#).unwrap(),
            [
                pem("a.pem", None),
                pem("b.pem", Some("2025-06")),
                pem("c.pem", None)
            ]
        );
        // The environment still takes a list of paths.
        let file = write(&format!("{MINIMAL}\n[auth.jwt]\n"));
        let env = vec![(
            "TIDEGATE__AUTH__JWT__RS256_PUBLIC_KEYS".into(),
            "a.pem,b.pem".into(),
        )];
        let settings = Settings::from_sources(Some(file.path()), env, false).unwrap();
        assert_eq!(
            settings.auth.jwt.unwrap().rs256_public_keys,
            [pem("a.pem", None), pem("b.pem", None)]
        );
        for bad in [
            r#"[{ file = "a.pem", kid = "k" }, { file = "b.pem", kid = "k" }]"#,
            r#"[{ file = "a.pem", kid = "" }]"#,
            r#"[{ file = "a.pem", kdi = "k" }]"#,
        ] {
            let error = jwt(bad).unwrap_err().to_string();
            assert!(error.contains("rs256_public_keys"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_jwks_file_is_checked_every_ten_seconds_unless_configured() {
        let jwt = |extra: &str, env: Vec<(String, String)>| {
            let file = write(&format!(
                "{MINIMAL}\n[auth.jwt]\njwks_file = \"jwks.json\"\n{extra}"
            ));
            Settings::from_sources(Some(file.path()), env, false)
                .map(|settings| settings.auth.jwt.unwrap().jwks_reload_interval)
        };
        assert_eq!(jwt("", vec![]).unwrap(), Duration::from_secs(10));
        assert_eq!(
            jwt("jwks_reload_interval = \"1m\"\n", vec![]).unwrap(),
            Duration::from_secs(60)
        );
        let env = vec![(
            "TIDEGATE__AUTH__JWT__JWKS_RELOAD_INTERVAL".into(),
            "250ms".into(),
        )];
        assert_eq!(jwt("", env).unwrap(), Duration::from_millis(250));
        let error = jwt("jwks_reload_interval = \"0s\"\n", vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("auth.jwt.jwks_reload_interval"), "{error}");
    }

    #[test]
    fn connections_close_when_their_token_expires_unless_configured() {
        let close = |extra: &str, env: Vec<(String, String)>| {
            let file = write(&format!(
                "{MINIMAL}\n[auth.jwt]\njwks_file = \"jwks.json\"\n{extra}"
            ));
            Settings::from_sources(Some(file.path()), env, false)
                .map(|settings| settings.auth.jwt.unwrap().close_on_expiry)
        };
        assert!(close("", vec![]).unwrap());
        assert!(!close("close_on_expiry = false\n", vec![]).unwrap());
        let env = vec![(
            "TIDEGATE__AUTH__JWT__CLOSE_ON_EXPIRY".into(),
            "false".into(),
        )];
        assert!(!close("", env).unwrap());
        let error = close("close_on_expiry = \"sometimes\"\n", vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("close_on_expiry"), "{error}");
    }
}
