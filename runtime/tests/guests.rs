//! The example functions of `functions/` (chat rooms, the custom-routes
//! router) against the runtime: the effects they ask for, with the state
//! kept between messages the way the gateway keeps it.

mod support;

use std::sync::Arc;

use runtime::{Context, Effect, Function, HandlerError, Payload, Priority, Registry};
use support::{connection, context, load};

fn registry() -> Registry {
    support::registry("guests-artifacts")
}

fn text(message: &str) -> Payload {
    Payload::Text(message.into())
}

/// One message through `function`, as the gateway runs it: the effects, or
/// the function's handler error.
async fn call(
    function: &Function,
    ctx: &Context,
    message: Payload,
) -> Result<Vec<Effect>, HandlerError> {
    function
        .on_message(Arc::new(ctx.clone()), message, Priority::Normal)
        .await
        .expect("the call runs")
}

/// Carry out the `set-state` effects as the gateway does: the last one is
/// the state the next call sees.
fn keep_state(ctx: &mut Context, effects: &[Effect]) {
    for effect in effects {
        if let Effect::SetState(state) = effect {
            ctx.state = Some(state.clone());
        }
    }
}

fn bad_request(result: Result<Vec<Effect>, HandlerError>) -> String {
    match result {
        Err(HandlerError::BadRequest(why)) => why,
        other => panic!("expected a bad-request error, got {other:?}"),
    }
}

#[tokio::test]
async fn chat_keeps_the_nickname_in_state_across_scale_to_zero() {
    let registry = registry();
    let chat = load(&registry, "chat", tidegate_functions::CHAT_PATH).await;
    let mut ctx = context("node-1.conn-1", &[]);

    let effects = call(&chat, &ctx, text(r#"{"action":"nick","name":"ada"}"#))
        .await
        .expect("nick is accepted");
    match effects.as_slice() {
        [Effect::SetState(_), Effect::Reply(Payload::Text(ack))] => {
            assert_eq!(ack, r#"{"ok":"nick","name":"ada"}"#)
        }
        other => panic!("unexpected effects {other:?}"),
    }
    keep_state(&mut ctx, &effects);
    // The function holds nothing between messages: only the gateway's copy
    // of the state carries the nickname over.
    registry.release_all_idle();
    assert_eq!(chat.live_instances(), 0);

    let effects = call(&chat, &ctx, text(r#"{"action":"join","room":"lobby"}"#))
        .await
        .expect("join is accepted");
    keep_state(&mut ctx, &effects);
    registry.release_all_idle();

    let effects = call(
        &chat,
        &ctx,
        text(r#"{"action":"send","room":"lobby","text":"hello ✓"}"#),
    )
    .await
    .expect("send is accepted");
    match effects.as_slice() {
        [Effect::Broadcast((room, Payload::Text(line)))] => {
            assert_eq!(room, "lobby");
            assert_eq!(line, r#"{"from":"ada","room":"lobby","text":"hello ✓"}"#);
        }
        other => panic!("unexpected effects {other:?}"),
    }
}

#[tokio::test]
async fn chat_names_a_sender_without_nickname_by_its_sub_claim() {
    let registry = registry();
    let chat = load(&registry, "chat", tidegate_functions::CHAT_PATH).await;
    let mut ctx = context("node-1.conn-1", &[("sub", "grace")]);
    let effects = call(&chat, &ctx, text(r#"{"action":"join","room":"r"}"#))
        .await
        .expect("join is accepted");
    keep_state(&mut ctx, &effects);

    let effects = call(
        &chat,
        &ctx,
        text(r#"{"action":"send","room":"r","text":"hi"}"#),
    )
    .await
    .expect("send is accepted");
    assert!(
        matches!(effects.as_slice(), [Effect::Broadcast((_, Payload::Text(line)))]
            if line == r#"{"from":"grace","room":"r","text":"hi"}"#),
        "{effects:?}"
    );
}

#[tokio::test]
async fn chat_join_and_leave_change_the_room_and_acknowledge() {
    let registry = registry();
    let chat = load(&registry, "chat", tidegate_functions::CHAT_PATH).await;
    let mut ctx = context("node-1.conn-1", &[]);
    for action in ["join", "leave"] {
        let message = format!(r#"{{"action":"{action}","room":"lobby"}}"#);
        let effects = call(&chat, &ctx, text(&message))
            .await
            .unwrap_or_else(|e| panic!("{action} is accepted: {e:?}"));
        keep_state(&mut ctx, &effects);
        let [
            change,
            Effect::SetState(_),
            Effect::Reply(Payload::Text(ack)),
        ] = effects.as_slice()
        else {
            panic!("unexpected effects {effects:?}");
        };
        match (action, change) {
            ("join", Effect::Join(room)) | ("leave", Effect::Leave(room)) => {
                assert_eq!(room, "lobby")
            }
            other => panic!("unexpected effect for {other:?}"),
        }
        assert_eq!(*ack, format!(r#"{{"ok":"{action}","room":"lobby"}}"#));
    }
    // Out of the room, the connection may no longer send to it.
    let message = text(r#"{"action":"send","room":"lobby","text":"x"}"#);
    let why = bad_request(call(&chat, &ctx, message).await);
    assert!(why.contains("join room"), "{why}");
}

#[tokio::test]
async fn chat_refuses_malformed_messages_as_bad_requests() {
    let registry = registry();
    let chat = load(&registry, "chat", tidegate_functions::CHAT_PATH).await;
    let ctx = context("node-1.conn-1", &[]);
    let long_room = format!(r#"{{"action":"join","room":"{}"}}"#, "r".repeat(65));
    let long_nick = format!(r#"{{"action":"nick","name":"{}"}}"#, "n".repeat(33));
    for (message, says) in [
        ("not json", "JSON"),
        (r#"{"action":"dance"}"#, "unknown variant `dance`"),
        (r#"{"action":"join"}"#, "missing field `room`"),
        (long_room.as_str(), "room name"),
        (r#"{"action":"join","room":"a/b"}"#, "room name"),
        (long_nick.as_str(), "nickname"),
        (r#"{"action":"nick","name":"a\nb"}"#, "nickname"),
        (r#"{"action":"send","room":"r","text":"x"}"#, "join room"),
    ] {
        let why = bad_request(call(&chat, &ctx, text(message)).await);
        assert!(why.contains(says), "{message}: {why}");
    }
}

#[tokio::test]
async fn router_answers_with_the_action_it_was_sent() {
    let registry = registry();
    // One component deployed under two route keys' names.
    let join = load(&registry, "chat-join", tidegate_functions::ROUTER_PATH).await;
    let fallback = load(&registry, "chat-default", tidegate_functions::ROUTER_PATH).await;
    let ctx = context("node-1.conn-1", &[]);

    for (function, message, answer) in [
        (
            &join,
            text(r#"{"action":"join","room":"r"}"#),
            r#"{"function":"router","action":"join","echo":"{\"action\":\"join\",\"room\":\"r\"}"}"#,
        ),
        (
            &fallback,
            text("plain text"),
            r#"{"function":"router","action":null,"echo":"plain text"}"#,
        ),
        (
            &fallback,
            text(r#"{"action":7}"#),
            r#"{"function":"router","action":null,"echo":"{\"action\":7}"}"#,
        ),
        (
            &fallback,
            Payload::Binary(vec![0, 255]),
            r#"{"function":"router","action":null,"echo":[0,255]}"#,
        ),
    ] {
        let effects = call(function, &ctx, message).await.expect("answered");
        assert!(
            matches!(effects.as_slice(), [Effect::Reply(Payload::Text(got))] if got == answer),
            "{effects:?}"
        );
    }
}

#[tokio::test]
async fn router_refuses_a_connection_with_the_status_asked_for() {
    let registry = registry();
    let router = load(&registry, "router", tidegate_functions::ROUTER_PATH).await;
    for (query, accept, status) in [
        (vec![], true, 101),
        (vec![("refuse", "403")], false, 403),
        (vec![("refuse", "503")], false, 503),
        (vec![("refuse", "200")], false, 400),
        (vec![("refuse", "no")], false, 400),
    ] {
        let decision = router
            .on_connect(Arc::new(connection(&query)))
            .await
            .expect("on-connect runs");
        assert_eq!(
            (decision.accept, decision.status),
            (accept, status),
            "{query:?}"
        );
    }
}

#[tokio::test]
async fn router_tells_its_group_when_a_watched_connection_closes() {
    let registry = registry();
    let router = load(&registry, "router", tidegate_functions::ROUTER_PATH).await;
    let decision = router
        .on_connect(Arc::new(connection(&[("notify", "watchers")])))
        .await
        .expect("on-connect runs");
    assert!(decision.accept);
    let mut ctx = context("node-1.conn-7", &[]);
    match decision.effects.as_slice() {
        [Effect::Join(group), Effect::SetState(_)] => assert_eq!(group, "watchers"),
        other => panic!("unexpected effects {other:?}"),
    }
    keep_state(&mut ctx, &decision.effects);

    let effects = router
        .on_disconnect(Arc::new(ctx), 1006, String::new())
        .await
        .expect("on-disconnect runs");
    match effects.as_slice() {
        [Effect::Broadcast((group, Payload::Text(notice)))] => {
            assert_eq!(group, "watchers");
            assert_eq!(
                notice,
                r#"{"function":"router","disconnected":"node-1.conn-7","code":1006}"#
            );
        }
        other => panic!("unexpected effects {other:?}"),
    }
    // A connection that asked for nothing is not announced.
    let effects = router
        .on_disconnect(Arc::new(context("node-1.conn-8", &[])), 1000, String::new())
        .await
        .expect("on-disconnect runs");
    assert!(effects.is_empty(), "{effects:?}");
}
