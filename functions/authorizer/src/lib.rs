//! An example `$connect` authorizer. Configure it as `auth.authorizer` and
//! Tidegate calls its `on-connect` for every upgrade before the route's
//! function: it admits or refuses the client, and names it in claims that
//! every later call sees.
//!
//! This one admits demo API keys of the form `demo-<user>`, sent as
//! `Authorization: Bearer demo-<user>` or `?api_key=demo-<user>`, and sets
//! the claims `sub = <user>` and `auth = api-key`. Anything else is refused
//! with 401. A real authorizer would check a signature or a key list
//! compiled into it.

use tidegate_sdk::{ConnectDecision, Connection, Function};

struct Authorizer;

const PREFIX: &str = "demo-";

impl Function for Authorizer {
    fn on_connect(conn: Connection) -> ConnectDecision {
        let from_header = conn
            .headers
            .iter()
            .find(|(name, _)| name == "authorization")
            .and_then(|(_, value)| value.strip_prefix("Bearer "));
        let from_query = conn
            .query
            .iter()
            .find(|(name, _)| name == "api_key")
            .map(|(_, value)| value.as_str());
        match from_header
            .or(from_query)
            .and_then(|key| key.strip_prefix(PREFIX))
        {
            Some(user) if !user.is_empty() && user.chars().all(|c| c.is_ascii_alphanumeric()) => {
                ConnectDecision::accept().with_claims(vec![
                    ("sub".into(), user.into()),
                    ("auth".into(), "api-key".into()),
                ])
            }
            _ => ConnectDecision::reject(401),
        }
    }
}

tidegate_sdk::export!(Authorizer);
