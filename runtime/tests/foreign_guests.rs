//! The JavaScript and Python echo functions (`functions/js/echo`,
//! `functions/python/echo`) against the runtime.
//!
//! They are 12 and 18 MB components (an engine each: SpiderMonkey,
//! CPython). Compiling one takes about 4 minutes in the debug profile (the
//! compiler itself is unoptimised there), so these tests run on request,
//! against components built beforehand:
//!
//! ```sh
//! functions/build-guests.sh /tmp/guests
//! TIDEGATE_GUEST_COMPONENTS=/tmp/guests cargo test -p runtime --test foreign_guests -- --ignored
//! ```
//!
//! Run so, they require `TIDEGATE_GUEST_COMPONENTS`. The compiled code is
//! kept in the target's scratch directory and reused by the next run while
//! the components are unchanged.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use runtime::{Effect, Payload, Priority};
use support::{connection, context, load};

fn component(file: &str) -> PathBuf {
    let dir = std::env::var_os("TIDEGATE_GUEST_COMPONENTS").expect(
        "set TIDEGATE_GUEST_COMPONENTS to the directory functions/build-guests.sh wrote into",
    );
    Path::new(&dir).join(file)
}

/// Load the component, check that it echoes like the Rust echo does, and
/// print how long its compilation (or reuse of the compiled code) took.
async fn echoes_text_and_binary_unchanged(name: &str, file: &str) {
    let registry = support::registry("foreign-guests-artifacts");
    let path = component(file);
    let size = std::fs::metadata(&path).map_or(0, |file| file.len());
    let started = Instant::now();
    let function = load(&registry, name, &path).await;
    eprintln!(
        "{name}: {size} bytes, loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let decision = function
        .on_connect(Arc::new(connection(&[])))
        .await
        .expect("on-connect runs");
    assert!(decision.accept, "{name} accepts");

    let ctx = Arc::new(context("node-1.conn-7", &[]));
    // The second round runs in a fresh instance, made from the compiled code.
    for round in 0..2 {
        for message in [
            Payload::Text("hello, tidegate ✓".into()),
            Payload::Binary(vec![0, 1, 2, 255]),
            Payload::Text(String::new()),
        ] {
            let effects = function
                .on_message(ctx.clone(), message.clone(), Priority::Normal)
                .await
                .expect("runs")
                .expect("no handler error");
            let echoed = match (effects.as_slice(), &message) {
                ([Effect::Reply(Payload::Text(got))], Payload::Text(sent)) => got == sent,
                ([Effect::Reply(Payload::Binary(got))], Payload::Binary(sent)) => got == sent,
                _ => false,
            };
            assert!(echoed, "{name}, round {round}: {effects:?} for {message:?}");
        }
        registry.release_all_idle();
    }
    let effects = function
        .on_disconnect(ctx, 1000, "bye".into())
        .await
        .expect("on-disconnect runs");
    assert!(effects.is_empty(), "{name}: {effects:?}");
}

#[tokio::test]
#[ignore = "needs TIDEGATE_GUEST_COMPONENTS from functions/build-guests.sh (see the file's docs)"]
async fn javascript_echo_replies_with_text_and_binary_unchanged() {
    echoes_text_and_binary_unchanged("echo-js", "echo-js.wasm").await;
}

#[tokio::test]
#[ignore = "needs TIDEGATE_GUEST_COMPONENTS from functions/build-guests.sh (see the file's docs)"]
async fn python_echo_replies_with_text_and_binary_unchanged() {
    echoes_text_and_binary_unchanged("echo-py", "echo-py.wasm").await;
}
