//! The upgrade request as a client sends it: the head parser, routing,
//! the query string, the `Origin` check, the token's place (header or
//! query) and its validation, and the WebSocket handshake checks.

#![no_main]

mod common;

use std::collections::BTreeMap;
use std::sync::LazyLock;

use gateway::config::TokenSource;
use gateway::handshake::{check_origin, parse_head};
use gateway::router::Router;
use libfuzzer_sys::fuzz_target;

static ROUTER: LazyLock<Router> = LazyLock::new(|| {
    let routes: BTreeMap<String, String> = [("/", "echo"), ("/chat", "chat"), ("/chat/rooms", "rooms")]
        .into_iter()
        .map(|(path, function)| (path.to_owned(), function.to_owned()))
        .collect();
    Router::new(&routes)
});

const MAX_HEAD: usize = 8192;

fuzz_target!(|data: &[u8]| {
    let (request, len) = match parse_head(data, MAX_HEAD) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(data.len() < MAX_HEAD, "an incomplete head over the limit is refused");
            return;
        }
        Err(_) => return,
    };
    assert!(len <= data.len());
    let path = request.uri().path();
    if let Some(matched) = ROUTER.resolve(path) {
        assert!(path.starts_with(matched.route));
    }
    let mut query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let _ = check_origin(&request, &["https://app.example.com".to_owned()]);
    let source = TokenSource {
        header: "authorization".into(),
        query: "access_token".into(),
    };
    let before = query.len();
    if let Some(token) = source.take(request.headers(), &mut query) {
        assert!(query.len() + 1 >= before, "at most the token is taken out");
        let _ = common::VERIFIER.verify(&token);
    }
    let _ = tokio_tungstenite::tungstenite::handshake::server::create_response(&request);
});
