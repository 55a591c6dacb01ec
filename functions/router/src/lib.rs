//! An example for custom routes: it tells which action it was sent, so it
//! shows (and tests check) which function of a route served a message.
//!
//! A route can pick the function for each message from a field of the
//! message, as API Gateway's route selection does:
//!
//! ```json
//! {"path": "/chat", "connect": "router", "disconnect": "router",
//!  "default": "echo", "selection": "$request.body.action",
//!  "routes": {"join": "chat-join", "send": "chat-send"}}
//! ```
//!
//! Deploy this component under each of the route's names
//! (`tidegate fn deploy router.wasm --name chat-join`, then `--name
//! chat-send`, and as `router`), and `echo` as the default. Then
//! `{"action":"join",...}` runs `chat-join`, `{"action":"send",...}` runs
//! `chat-send`, and anything else (another action, no action, a message
//! that is not JSON, a binary message) runs the default: the client sees
//! from the reply's shape which one answered, and `tidegate fn show NAME`
//! counts each name's invocations. Each name is a function of its own,
//! with its own versions, so one of them can be rolled forward or back
//! alone.
//!
//! Every text message is answered with
//! `{"function":"router","action":A,"echo":M}`, where `A` is the message's
//! `action` when it is a JSON object with a string `action` (else `null`)
//! and `M` is the message's text, unchanged, as a JSON string. A binary
//! message is answered the same way with `action` `null` and `echo` the
//! array of its bytes.
//!
//! Connecting, it reads two query parameters:
//! - `refuse=STATUS` refuses the connection with that HTTP status (400 to
//!   599; anything else refuses with 400), to check that a route's
//!   `connect` function decides the status the client gets;
//! - `notify=GROUP` joins the connection to `GROUP` and keeps the name in
//!   its state; when the connection closes, `on-disconnect` broadcasts
//!   `{"function":"router","disconnected":ID,"code":CODE}` to the group, so
//!   the other members see that the route's `disconnect` function ran, also
//!   after an abrupt close.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tidegate_sdk::{
    ConnectDecision, Connection, Context, Effect, Function, HandlerError, Payload, broadcast_json,
    join, reply_json, set_state,
};

/// What the gateway keeps for a connection between calls.
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct Watch {
    /// The group told when this connection closes.
    notify: Option<String>,
}

/// The answer to every message.
#[derive(Serialize)]
struct Answer<'a> {
    function: &'static str,
    action: Option<&'a str>,
    echo: Echo<'a>,
}

/// The message as it arrived.
#[derive(Serialize)]
#[serde(untagged)]
enum Echo<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// The notice broadcast when a watched connection closes.
#[derive(Serialize)]
struct Disconnected<'a> {
    function: &'static str,
    disconnected: &'a str,
    code: u16,
}

struct Router;

impl Function for Router {
    fn on_connect(conn: Connection) -> ConnectDecision {
        if let Some(status) = conn.query("refuse") {
            let status = status
                .parse()
                .ok()
                .filter(|status| (400..=599).contains(status));
            return ConnectDecision::reject(status.unwrap_or(400));
        }
        let Some(group) = conn.query("notify") else {
            return ConnectDecision::accept();
        };
        let watch = Watch {
            notify: Some(group.to_owned()),
        };
        match set_state(&watch) {
            Ok(state) => ConnectDecision::accept().with_effects(vec![join(group), state]),
            Err(_) => ConnectDecision::reject(500),
        }
    }

    fn on_message(_ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        let parsed: Option<Value>;
        let (action, echo) = match &message {
            Payload::Text(text) => {
                parsed = serde_json::from_str(text).ok();
                let action = parsed
                    .as_ref()
                    .and_then(|value| value.get("action"))
                    .and_then(Value::as_str);
                (action, Echo::Text(text))
            }
            Payload::Binary(bytes) => (None, Echo::Binary(bytes)),
        };
        let answer = Answer {
            function: "router",
            action,
            echo,
        };
        Ok(vec![reply_json(&answer)?])
    }

    fn on_disconnect(ctx: Context, code: u16, _reason: String) -> Vec<Effect> {
        let notify = ctx.state::<Watch>().ok().flatten().and_then(|w| w.notify);
        let notice = Disconnected {
            function: "router",
            disconnected: &ctx.id,
            code,
        };
        notify
            .and_then(|group| broadcast_json(group, &notice).ok())
            .into_iter()
            .collect()
    }
}

tidegate_sdk::export!(Router);
