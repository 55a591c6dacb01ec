//! Write Tidegate functions in Rust.
//!
//! Implement [`Function`] for a type, overriding the events you care about,
//! and export it with [`export!`]. Events you do not implement get the
//! defaults: connections are accepted, messages get no reply, disconnects do
//! nothing.
//!
//! A handler does no I/O itself: it returns [`Effect`]s, which the gateway
//! carries out in order once the handler has returned. The functions of this
//! crate build them ([`reply_text`], [`reply_json`], [`send`], [`join`],
//! [`leave`], [`broadcast`], [`publish`], [`set_state`], [`close`]), read
//! JSON messages ([`Payload::json`]) and keep typed per-connection state
//! ([`Context::state`] and [`set_state`]).
//!
//! ```ignore
//! use serde::Deserialize;
//! use tidegate_sdk::{Context, Effect, Function, HandlerError, Payload};
//! use tidegate_sdk::{broadcast_json, join, reply_json};
//!
//! #[derive(Deserialize)]
//! struct Join {
//!     room: String,
//! }
//!
//! struct Rooms;
//!
//! impl Function for Rooms {
//!     fn on_message(ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
//!         let Join { room } = message.json()?;
//!         Ok(vec![
//!             join(&room),
//!             reply_json(&serde_json::json!({ "ok": "join", "room": room }))?,
//!             broadcast_json(&room, &serde_json::json!({ "joined": ctx.id }))?,
//!         ])
//!     }
//! }
//!
//! tidegate_sdk::export!(Rooms);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`: the target
//! emits a component directly. `functions/README.md` in the Tidegate
//! repository goes from there to a deployed function.

use serde::Serialize;
use serde::de::DeserializeOwned;

#[doc(hidden)]
#[expect(
    clippy::too_many_arguments,
    reason = "generated code: the canonical ABI flattens records into many arguments"
)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler",
        default_bindings_module: "tidegate_sdk::bindings",
    });
}

pub use bindings::tidegate::gateway::logging::{Level, log};
pub use bindings::tidegate::gateway::types::{
    ConnectDecision, Connection, Context, Effect, HandlerError, Payload,
};

/// A Tidegate function: the three events of a WebSocket connection's life.
pub trait Function {
    /// A client is connecting. Return [`ConnectDecision::accept`] to let it in,
    /// or [`ConnectDecision::reject`] with an HTTP status to refuse it.
    fn on_connect(conn: Connection) -> ConnectDecision {
        let _ = conn;
        ConnectDecision::accept()
    }

    /// A client sent a message. Return the effects to carry out, in order;
    /// [`reply_text`] and the other functions of this crate build them.
    ///
    /// # Errors
    /// [`HandlerError::BadRequest`] tells the client its message was malformed;
    /// [`HandlerError::Internal`] reports a failure of the function. Either
    /// way the connection stays open and no effect of this call is carried out.
    fn on_message(ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        let _ = (ctx, message);
        Ok(Vec::new())
    }

    /// The connection closed with this WebSocket close code and reason. The
    /// returned effects are carried out too, except replies: the socket is
    /// gone.
    fn on_disconnect(ctx: Context, code: u16, reason: String) -> Vec<Effect> {
        let _ = (ctx, code, reason);
        Vec::new()
    }
}

impl ConnectDecision {
    /// Accept the connection, with no subprotocol and no effects.
    pub fn accept() -> Self {
        Self {
            accept: true,
            status: 101,
            subprotocol: None,
            effects: Vec::new(),
            claims: Vec::new(),
        }
    }

    /// Refuse the connection with this HTTP status (for example 401 or 403);
    /// the client gets it instead of the WebSocket upgrade.
    pub fn reject(status: u16) -> Self {
        Self {
            accept: false,
            status,
            subprotocol: None,
            effects: Vec::new(),
            claims: Vec::new(),
        }
    }

    /// Attach claims to the connection (an authorizer's verdict on who the
    /// client is); later calls see them in [`Context::claims`].
    pub fn with_claims(mut self, claims: Vec<(String, String)>) -> Self {
        self.claims = claims;
        self
    }

    /// Agree on this subprotocol, which must be one the client offered.
    pub fn with_subprotocol(mut self, subprotocol: impl Into<String>) -> Self {
        self.subprotocol = Some(subprotocol.into());
        self
    }

    /// Effects to carry out once the connection is open, for example
    /// [`join`] a group or [`set_state`] from the query string.
    pub fn with_effects(mut self, effects: Vec<Effect>) -> Self {
        self.effects = effects;
        self
    }
}

impl Connection {
    /// The first value of query parameter `name`, if the client sent it.
    pub fn query(&self, name: &str) -> Option<&str> {
        find(&self.query, name)
    }

    /// The value of request header `name` (lower case), if the client sent it
    /// and the gateway is configured to pass it on.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The value of claim `name` (from JWT validation or an authorizer).
    pub fn claim(&self, name: &str) -> Option<&str> {
        find(&self.claims, name)
    }

    /// The connection's state, decoded from JSON; see [`Context::state`].
    ///
    /// # Errors
    /// [`HandlerError::Internal`] when the state is not JSON of type `T`.
    pub fn state<T: DeserializeOwned>(&self) -> Result<Option<T>, HandlerError> {
        decode_state(self.state.as_deref())
    }
}

impl Context {
    /// The value of claim `name` (from JWT validation or an authorizer).
    pub fn claim(&self, name: &str) -> Option<&str> {
        find(&self.claims, name)
    }

    /// The connection's state, decoded from the JSON an earlier call stored
    /// with [`set_state`]; `None` before anything was stored.
    ///
    /// The gateway keeps the state, not the function, so it survives the
    /// function being scaled to zero and a new version being deployed. A
    /// new version that changes `T` should still read the old state: give
    /// new fields `#[serde(default)]`.
    ///
    /// # Errors
    /// [`HandlerError::Internal`] when the state is not JSON of type `T`
    /// (for example, stored by a version with an incompatible state type).
    pub fn state<T: DeserializeOwned>(&self) -> Result<Option<T>, HandlerError> {
        decode_state(self.state.as_deref())
    }
}

impl Payload {
    /// The message's text, if it is a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            Self::Binary(_) => None,
        }
    }

    /// The message's bytes: the UTF-8 of a text message, or a binary
    /// message's contents.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text(text) => text.as_bytes(),
            Self::Binary(bytes) => bytes,
        }
    }

    /// Parse the message (text or binary) as JSON of type `T`.
    ///
    /// # Errors
    /// [`HandlerError::BadRequest`] saying what is wrong (not JSON, a
    /// missing field, an unknown `action`, ...), which the gateway passes on
    /// to the client; return it with `?`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(self.as_bytes()).map_err(|error| {
            HandlerError::BadRequest(format!("the message is not the JSON expected: {error}"))
        })
    }
}

impl HandlerError {
    /// The client's message was malformed; the client is told `why` and
    /// stays connected.
    pub fn bad_request(why: impl Into<String>) -> Self {
        Self::BadRequest(why.into())
    }

    /// The function failed; the client is told so.
    pub fn internal(why: impl Into<String>) -> Self {
        Self::Internal(why.into())
    }
}

/// Reply to the calling connection with `payload`.
pub fn reply(payload: Payload) -> Effect {
    Effect::Reply(payload)
}

/// Reply to the calling connection with a text message.
pub fn reply_text(text: impl Into<String>) -> Effect {
    Effect::Reply(Payload::Text(text.into()))
}

/// Reply to the calling connection with `value` as a JSON text message.
///
/// # Errors
/// [`HandlerError::Internal`] if `value` cannot be written as JSON (a map
/// with non-string keys, a failing `Serialize` implementation).
pub fn reply_json<T: Serialize + ?Sized>(value: &T) -> Result<Effect, HandlerError> {
    Ok(Effect::Reply(json_text(value)?))
}

/// Send `payload` to the connection with id `connection_id` (any
/// connection, not only the caller). A send to a connection that is gone is
/// counted by the gateway, not an error for the caller.
pub fn send(connection_id: impl Into<String>, payload: Payload) -> Effect {
    Effect::Send((connection_id.into(), payload))
}

/// Send `value` as a JSON text message to the connection with id
/// `connection_id`; see [`send`].
///
/// # Errors
/// As [`reply_json`].
pub fn send_json<T: Serialize + ?Sized>(
    connection_id: impl Into<String>,
    value: &T,
) -> Result<Effect, HandlerError> {
    Ok(send(connection_id, json_text(value)?))
}

/// Add the calling connection to `group` (a name of 1 to 128 bytes of
/// printable characters without spaces). The gateway bounds how many
/// groups a connection may be in (`websocket.max_groups`); joining one more
/// fails the message with a clear error, and none of its effects happen.
/// Joining a group twice is the same as joining it once.
pub fn join(group: impl Into<String>) -> Effect {
    Effect::Join(group.into())
}

/// Take the calling connection out of `group`. Leaving a group it is not in
/// does nothing. A closed connection leaves all its groups.
pub fn leave(group: impl Into<String>) -> Effect {
    Effect::Leave(group.into())
}

/// Send `payload` to every member of `group`, the calling connection
/// included if it is a member when this effect is carried out (put a
/// [`leave`] before it to leave itself out).
pub fn broadcast(group: impl Into<String>, payload: Payload) -> Effect {
    Effect::Broadcast((group.into(), payload))
}

/// Send `value` as a JSON text message to every member of `group`; see
/// [`broadcast`].
///
/// # Errors
/// As [`reply_json`].
pub fn broadcast_json<T: Serialize + ?Sized>(
    group: impl Into<String>,
    value: &T,
) -> Result<Effect, HandlerError> {
    Ok(broadcast(group, json_text(value)?))
}

/// Publish `body` as an extra message to the gateway's exchange
/// (`queue.exchange`) with this routing key (at most 255 bytes). The broker
/// confirms it like the copy of the message: in receipt mode, the effects
/// after it (a reply, say) are carried out once it is durable.
pub fn publish(routing_key: impl Into<String>, body: impl Into<Vec<u8>>) -> Effect {
    Effect::Publish((routing_key.into(), body.into()))
}

/// Replace the connection's state with `state` as JSON. The gateway keeps
/// it (up to `runtime.max_state_size` bytes; over that the message fails
/// with a clear error) and passes it to every later call, where
/// [`Context::state`] reads it back.
///
/// # Errors
/// As [`reply_json`].
pub fn set_state<T: Serialize + ?Sized>(state: &T) -> Result<Effect, HandlerError> {
    serde_json::to_vec(state)
        .map(Effect::SetState)
        .map_err(|error| HandlerError::Internal(format!("the state is not JSON: {error}")))
}

/// Close the connection with this WebSocket close code (1000, or one of
/// the application codes 3000-4999; any other closes with 1000) and reason
/// (cut to 123 bytes). Effects after it are not carried out.
pub fn close(code: u16, reason: impl Into<String>) -> Effect {
    Effect::Close((code, reason.into()))
}

/// `value` as a JSON text message.
fn json_text<T: Serialize + ?Sized>(value: &T) -> Result<Payload, HandlerError> {
    serde_json::to_string(value)
        .map(Payload::Text)
        .map_err(|error| HandlerError::Internal(format!("the message is not JSON: {error}")))
}

fn decode_state<T: DeserializeOwned>(state: Option<&[u8]>) -> Result<Option<T>, HandlerError> {
    state
        .map(serde_json::from_slice)
        .transpose()
        .map_err(|error| {
            HandlerError::Internal(format!(
                "the connection's state is not the JSON this function keeps: {error}"
            ))
        })
}

fn find<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

impl<T: Function> bindings::Guest for T {
    fn on_connect(conn: Connection) -> ConnectDecision {
        <T as Function>::on_connect(conn)
    }

    fn on_message(ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        <T as Function>::on_message(ctx, message)
    }

    fn on_disconnect(ctx: Context, code: u16, reason: String) -> Vec<Effect> {
        <T as Function>::on_disconnect(ctx, code, reason)
    }
}

/// Export a type implementing [`Function`] as this component's handler.
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        $crate::bindings::__export_handler!($ty with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Serialize, Debug, PartialEq)]
    struct Nick {
        name: String,
    }

    fn context(state: Option<&[u8]>) -> Context {
        Context {
            id: "node-1.conn-1".into(),
            route: "/".into(),
            claims: vec![("sub".into(), "ada".into())],
            state: state.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn json_reads_text_and_binary_messages() {
        let text = Payload::Text(r#"{"name":"ada"}"#.into());
        let binary = Payload::Binary(br#"{"name":"ada"}"#.to_vec());
        for message in [text, binary] {
            assert_eq!(message.json::<Nick>().unwrap(), Nick { name: "ada".into() });
        }
    }

    #[test]
    fn json_refuses_a_malformed_message_as_a_bad_request() {
        for (message, says) in [
            ("not json", "expected"),
            (r#"{"nom":"x"}"#, "missing field `name`"),
        ] {
            match Payload::Text(message.into()).json::<Nick>() {
                Err(HandlerError::BadRequest(why)) => assert!(why.contains(says), "{why}"),
                other => panic!("{message}: {other:?}"),
            }
        }
    }

    #[test]
    fn state_round_trips_through_set_state() {
        let Effect::SetState(bytes) = set_state(&Nick { name: "ada".into() }).unwrap() else {
            panic!("set_state builds a SetState effect");
        };
        let ctx = context(Some(&bytes));
        assert_eq!(
            ctx.state::<Nick>().unwrap(),
            Some(Nick { name: "ada".into() })
        );
        assert_eq!(context(None).state::<Nick>().unwrap(), None);
    }

    #[test]
    fn state_of_another_shape_is_an_internal_error() {
        match context(Some(b"[1,2]")).state::<Nick>() {
            Err(HandlerError::Internal(why)) => assert!(why.contains("state"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn effect_helpers_build_the_effects_they_name() {
        assert!(matches!(reply_text("hi"), Effect::Reply(Payload::Text(t)) if t == "hi"));
        assert!(
            matches!(reply_json(&Nick { name: "a".into() }).unwrap(), Effect::Reply(Payload::Text(t)) if t == r#"{"name":"a"}"#)
        );
        assert!(matches!(join("r"), Effect::Join(g) if g == "r"));
        assert!(matches!(leave("r"), Effect::Leave(g) if g == "r"));
        assert!(
            matches!(broadcast_json("r", &1).unwrap(), Effect::Broadcast((g, Payload::Text(t))) if g == "r" && t == "1")
        );
        assert!(
            matches!(send("c", Payload::Binary(vec![1])), Effect::Send((c, Payload::Binary(b))) if c == "c" && b == [1])
        );
        assert!(matches!(publish("k", "x"), Effect::Publish((k, b)) if k == "k" && b == b"x"));
        assert!(matches!(close(4000, "bye"), Effect::Close((4000, r)) if r == "bye"));
        assert_eq!(context(None).claim("sub"), Some("ada"));
    }
}
