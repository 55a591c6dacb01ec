//! Authentication on connect: JWT (HS256, RS256 from a PEM key or a JWKS
//! file) in a header or the query string, and an authorizer function.
//! Refusals are HTTP 401 before the upgrade; claims reach the function.

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, close_frame, round_trip};

const SECRET: &str = "an-end-to-end-test-secret-of-32-bytes-or-more";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/e2e/fixtures")
        .join(name)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A gateway serving the `faulty` function (whose `claims` command echoes
/// the connection's claims) with this `[auth]` section.
fn gateway(auth: &str) -> Gateway {
    Gateway::start(Options::default().config(&format!(
        r#"
        [functions.faulty]
        wasm = "{}"
        [functions.authorizer]
        wasm = "{}"
        [routes]
        "/" = "faulty"
        {auth}
        "#,
        tidegate_functions::FAULTY_PATH,
        tidegate_functions::AUTHORIZER_PATH,
    )))
}

fn claims(sub: &str, exp_in: i64) -> serde_json::Value {
    json!({"sub": sub, "aud": "tidegate", "iss": "https://id.example", "exp": now() + exp_in})
}

fn hs256(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs256(claims: &serde_json::Value, kid: Option<&str>) -> String {
    rs256_with("jwt-test-rsa.key", claims, kid)
}

/// A token signed with the private key in fixture `key`.
fn rs256_with(key: &str, claims: &serde_json::Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture(key)).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

/// The claims the function sees, as `name=value` lines.
async fn seen_claims(client: &mut crate::harness::Client) -> String {
    match round_trip(client, Message::Text("claims".into())).await {
        Message::Text(text) => text.to_string(),
        other => panic!("unexpected {other:?}"),
    }
}

async fn refused(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match gateway.connect_with(path, headers).await {
        Ok(_) => panic!("{path} was accepted"),
        Err(refusal) => refusal,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_tokens_are_checked_and_their_claims_reach_the_function() {
    let gateway = gateway(&format!(
        r#"
        [auth.jwt]
        hs256_secret = "{SECRET}"
        audience = ["tidegate"]
        issuer = ["https://id.example"]
        leeway = "0s"
        "#
    ));
    let (status, body) = refused(&gateway, "/", &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("no token"), "{body}");

    let expired = hs256(&claims("ada", -60));
    let (status, body) = refused(&gateway, &format!("/?access_token={expired}"), &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");

    let mut wrong_audience = claims("ada", 60);
    wrong_audience["aud"] = json!("another-service");
    let bearer = format!("Bearer {}", hs256(&wrong_audience));
    let (status, body) = refused(&gateway, "/", &[("authorization", &bearer)]).await;
    assert_eq!(status, 401);
    assert!(body.contains("aud"), "{body}");

    // In the header...
    let bearer = format!("Bearer {}", hs256(&claims("ada", 60)));
    let mut client = gateway
        .connect_with("/", &[("authorization", &bearer)])
        .await
        .expect("a valid token connects");
    let seen = seen_claims(&mut client).await;
    assert!(
        seen.contains("sub=ada") && seen.contains("aud=tidegate"),
        "{seen}"
    );
    // ... or in the query string, for browsers.
    let token = hs256(&claims("grace", 60));
    let mut client = gateway
        .connect_with(&format!("/?access_token={token}"), &[])
        .await
        .expect("a valid token in the query connects");
    assert!(seen_claims(&mut client).await.contains("sub=grace"));
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"invalid_token\"}",
            2.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_verify_against_a_jwks_file_by_kid_and_against_pem_keys() {
    let gateway = gateway(&format!(
        r#"
        [auth.jwt]
        jwks_file = "{}"
        rs256_public_keys = ["{}"]
        "#,
        fixture("jwt-test-jwks.json").display(),
        fixture("jwt-test-rsa.pub.pem").display(),
    ));
    for kid in [Some("test-1"), None] {
        let bearer = format!("Bearer {}", rs256(&claims("lin", 60), kid));
        let mut client = gateway
            .connect_with("/", &[("authorization", &bearer)])
            .await
            .unwrap_or_else(|e| panic!("kid {kid:?}: {e:?}"));
        assert!(seen_claims(&mut client).await.contains("sub=lin"));
    }
    let bearer = format!("Bearer {}", rs256(&claims("lin", 60), Some("rotated-away")));
    let (status, body) = refused(&gateway, "/", &[("authorization", &bearer)]).await;
    assert_eq!(status, 401);
    assert!(body.contains("rotated-away"), "{body}");
    // An HS256 token signed with the public key as secret (the classic
    // algorithm confusion) is refused: no HS256 key is configured.
    let public = std::fs::read(fixture("jwt-test-rsa.pub.pem")).unwrap();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("mallory", 60),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    let (status, _) = refused(&gateway, &format!("/?access_token={confused}"), &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pem_keys_given_a_kid_verify_the_tokens_that_name_it() {
    let gateway = gateway(&format!(
        r#"
        [auth.jwt]
        rs256_public_keys = [
            {{ file = "{}", kid = "pem-1" }},
            {{ file = "{}", kid = "pem-2" }},
        ]
        "#,
        fixture("jwt-test-rsa.pub.pem").display(),
        fixture("jwt-test-rsa-2.pub.pem").display(),
    ));
    for (key, kid) in [
        ("jwt-test-rsa.key", Some("pem-1")),
        ("jwt-test-rsa-2.key", Some("pem-2")),
        // Without a kid, every key is tried.
        ("jwt-test-rsa-2.key", None),
    ] {
        let bearer = format!("Bearer {}", rs256_with(key, &claims("lin", 60), kid));
        let mut client = gateway
            .connect_with("/", &[("authorization", &bearer)])
            .await
            .unwrap_or_else(|e| panic!("{key} with kid {kid:?}: {e:?}"));
        assert!(seen_claims(&mut client).await.contains("sub=lin"));
    }
    // The kid chooses the key: a token naming the other key is refused.
    let bearer = format!("Bearer {}", rs256(&claims("lin", 60), Some("pem-2")));
    let (status, body) = refused(&gateway, "/", &[("authorization", &bearer)]).await;
    assert_eq!(status, 401);
    assert!(body.contains("signature"), "{body}");
}

/// Connect with an RS256 token naming `kid`: accepted, or the refusal.
async fn connect_rs256(gateway: &Gateway, kid: &str) -> Result<(), (u16, String)> {
    let bearer = format!("Bearer {}", rs256(&claims("lin", 60), Some(kid)));
    gateway
        .connect_with("/", &[("authorization", &bearer)])
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_file_is_reloaded_and_a_bad_one_keeps_the_keys_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    // Written beside it and renamed into place, as a rotation should.
    let replace = |text: String| {
        let new = dir.path().join("jwks.json.new");
        std::fs::write(&new, text).unwrap();
        std::fs::rename(&new, &path).unwrap();
    };
    // The test key, published under `kid`.
    let jwks = |kid: &str| {
        let mut set: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("jwt-test-jwks.json")).unwrap()).unwrap();
        set["keys"][0]["kid"] = json!(kid);
        set.to_string()
    };
    replace(jwks("before"));
    let gateway = gateway(&format!(
        r#"
        [auth.jwt]
        jwks_file = "{}"
        jwks_reload_interval = "100ms"
        "#,
        path.display()
    ));
    connect_rs256(&gateway, "before")
        .await
        .expect("the first key");
    let (status, body) = connect_rs256(&gateway, "after").await.unwrap_err();
    assert_eq!(status, 401);
    assert!(body.contains("unknown key id"), "{body}");

    replace("{\"keys\": [".into());
    gateway
        .metric_reaches("tidegate_jwks_reloads_total{outcome=\"error\"}", 1.0)
        .await;
    connect_rs256(&gateway, "before")
        .await
        .expect("a broken file keeps the keys in use");

    replace(jwks("after"));
    gateway
        .metric_reaches("tidegate_jwks_reloads_total{outcome=\"ok\"}", 1.0)
        .await;
    connect_rs256(&gateway, "after")
        .await
        .expect("the rotated key");
    let (status, _) = connect_rs256(&gateway, "before").await.unwrap_err();
    assert_eq!(status, 401);
    assert!(gateway.log().contains("auth.jwt.jwks_file reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closes_with_1008_when_its_token_expires_unless_configured() {
    let jwt = |close: bool| {
        gateway(&format!(
            r#"
            [auth.jwt]
            hs256_secret = "{SECRET}"
            leeway = "0s"
            close_on_expiry = {close}
            "#
        ))
    };
    let closing = jwt(true);
    let lasting = jwt(false);
    let exp_in = 2;
    let token = hs256(&claims("ada", exp_in));
    let started = std::time::Instant::now();
    let mut closed = closing
        .connect_with(&format!("/?access_token={token}"), &[])
        .await
        .expect("a valid token connects");
    let mut open = lasting
        .connect_with(&format!("/?access_token={token}"), &[])
        .await
        .expect("a valid token connects");
    assert!(seen_claims(&mut closed).await.contains("sub=ada"));
    let (code, reason) = close_frame(&mut closed).await.expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
    // Not before exp (whole seconds, so up to one early from `started`).
    assert!(started.elapsed() >= std::time::Duration::from_secs(exp_in as u64 - 1));
    // With close_on_expiry = false the connection outlives its token.
    assert!(seen_claims(&mut open).await.contains("sub=ada"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorizer_function_admits_or_refuses_and_names_the_client() {
    let gateway = gateway("[auth]\nauthorizer = \"authorizer\"\n");
    let (status, _) = refused(&gateway, "/", &[]).await;
    assert_eq!(status, 401);
    let (status, _) = refused(&gateway, "/?api_key=wrong", &[]).await;
    assert_eq!(status, 401);
    let mut client = gateway
        .connect_with("/?api_key=demo-ada", &[])
        .await
        .expect("the authorizer admits a demo key");
    let seen = seen_claims(&mut client).await;
    assert_eq!(seen, "auth=api-key\nsub=ada");
    let mut client = gateway
        .connect_with("/", &[("authorization", "Bearer demo-grace")])
        .await
        .expect("the authorizer reads headers too");
    assert!(seen_claims(&mut client).await.contains("sub=grace"));
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"refused_by_authorizer\"}",
            2.0,
        )
        .await;
}
