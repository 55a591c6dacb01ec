//! Chat rooms. Clients send JSON text messages with an `action`:
//!
//! | message | effect | reply |
//! |---|---|---|
//! | `{"action":"join","room":"r"}` | joins group `r` | `{"ok":"join","room":"r"}` |
//! | `{"action":"leave","room":"r"}` | leaves group `r` | `{"ok":"leave","room":"r"}` |
//! | `{"action":"nick","name":"n"}` | keeps `n` as the nickname | `{"ok":"nick","name":"n"}` |
//! | `{"action":"send","room":"r","text":"t"}` | broadcasts to `r` | (none) |
//! | `{"action":"whisper","to":"<connection id>","text":"t"}` | sends to that connection | (none) |
//!
//! A `send` reaches every member of the room, the sender included, as
//! `{"from":"<nickname>","room":"r","text":"t"}`; only a member may send.
//! The nickname is the one set with `nick`, or else the connection's `sub`
//! claim (set by an authorizer or a JWT), or else its id. A `whisper`
//! reaches one connection, on whichever node of the cluster holds it, as
//! `{"from":"<nickname>","text":"t"}`; a connection that is gone gets
//! nothing (the gateway counts it).
//!
//! The nickname and the rooms a connection is in are its state, which the
//! gateway keeps between messages: it survives the function being scaled
//! to zero or replaced by a new version. Anything else, or a message this
//! function cannot read, is refused with a `bad-request` error telling why,
//! and the connection stays open.
//!
//! Room names are 1 to 64 ASCII letters, digits, `.`, `_` or `-` (a room is
//! a gateway group, whose name also appears in the management API's paths);
//! nicknames are 1 to 32 characters without control characters.

use serde::{Deserialize, Serialize};
use tidegate_sdk::{
    Context, Effect, Function, HandlerError, Payload, broadcast_json, join, leave, reply_json,
    send_json, set_state,
};

/// The longest room name, in bytes.
const MAX_ROOM_LEN: usize = 64;
/// The longest nickname, in characters.
const MAX_NICK_LEN: usize = 32;
/// How many rooms one connection may be in. The gateway's own bound on
/// groups per connection (`websocket.max_groups`) applies too.
const MAX_ROOMS: usize = 16;

/// A message from a client.
#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
enum Request {
    Join { room: String },
    Leave { room: String },
    Nick { name: String },
    Send { room: String, text: String },
    Whisper { to: String, text: String },
}

/// What the gateway keeps for each connection between messages.
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct Member {
    /// The nickname set with `nick`.
    nick: Option<String>,
    /// The rooms joined, in the order they were joined.
    rooms: Vec<String>,
}

/// The answer to `join`, `leave` and `nick`.
#[derive(Serialize)]
struct Ack<'a> {
    ok: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// A chat line, as every member of the room receives it (a whisper has
/// no room).
#[derive(Serialize)]
struct Line<'a> {
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    text: &'a str,
}

/// The name a connection's lines are from: its nickname, or its `sub`
/// claim, or its id.
fn sender<'a>(member: &'a Member, ctx: &'a Context) -> &'a str {
    member
        .nick
        .as_deref()
        .or_else(|| ctx.claim("sub"))
        .unwrap_or(&ctx.id)
}

struct Chat;

impl Function for Chat {
    fn on_message(ctx: Context, message: Payload) -> Result<Vec<Effect>, HandlerError> {
        let mut member: Member = ctx.state()?.unwrap_or_default();
        match message.json()? {
            Request::Join { room } => {
                check_room(&room)?;
                if !member.rooms.contains(&room) {
                    if member.rooms.len() == MAX_ROOMS {
                        return Err(HandlerError::bad_request(format!(
                            "a connection can be in at most {MAX_ROOMS} rooms; leave one first"
                        )));
                    }
                    member.rooms.push(room.clone());
                }
                Ok(vec![
                    join(&room),
                    set_state(&member)?,
                    reply_json(&Ack::room("join", &room))?,
                ])
            }
            Request::Leave { room } => {
                check_room(&room)?;
                member.rooms.retain(|joined| *joined != room);
                Ok(vec![
                    leave(&room),
                    set_state(&member)?,
                    reply_json(&Ack::room("leave", &room))?,
                ])
            }
            Request::Nick { name } => {
                check_nick(&name)?;
                let ack = reply_json(&Ack::nick(&name))?;
                member.nick = Some(name);
                Ok(vec![set_state(&member)?, ack])
            }
            Request::Send { room, text } => {
                if !member.rooms.contains(&room) {
                    return Err(HandlerError::bad_request(format!(
                        "join room {room:?} before sending to it"
                    )));
                }
                let line = Line {
                    from: sender(&member, &ctx),
                    room: Some(&room),
                    text: &text,
                };
                Ok(vec![broadcast_json(&room, &line)?])
            }
            Request::Whisper { to, text } => {
                let line = Line {
                    from: sender(&member, &ctx),
                    room: None,
                    text: &text,
                };
                Ok(vec![send_json(to, &line)?])
            }
        }
    }
}

impl<'a> Ack<'a> {
    fn room(ok: &'a str, room: &'a str) -> Self {
        Self {
            ok,
            room: Some(room),
            name: None,
        }
    }

    fn nick(name: &'a str) -> Self {
        Self {
            ok: "nick",
            room: None,
            name: Some(name),
        }
    }
}

fn check_room(room: &str) -> Result<(), HandlerError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if room.is_empty() || room.len() > MAX_ROOM_LEN || !room.chars().all(allowed) {
        return Err(HandlerError::bad_request(format!(
            "a room name is 1 to {MAX_ROOM_LEN} ASCII letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

fn check_nick(name: &str) -> Result<(), HandlerError> {
    let length = name.chars().count();
    if length == 0 || length > MAX_NICK_LEN || name.chars().any(char::is_control) {
        return Err(HandlerError::bad_request(format!(
            "a nickname is 1 to {MAX_NICK_LEN} characters, none of them control characters"
        )));
    }
    Ok(())
}

tidegate_sdk::export!(Chat);
