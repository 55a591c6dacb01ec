//! The echo function in JavaScript and in Python (`functions/js/echo`,
//! `functions/python/echo`), served by the real gateway over wss.
//!
//! The components are built by `functions/build-guests.sh` (into
//! `TIDEGATE_GUEST_COMPONENTS` when set, else into the target's scratch
//! directory; a second build with nothing changed takes well under a
//! second). They are 12 and 18 MB: their compiled code is kept in an
//! artifact directory in the target's scratch directory too, so only the
//! first run compiles them.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gateway, Options, round_trip};

/// The directory holding `echo-js.wasm` and `echo-py.wasm`, built now if
/// needed.
fn components() -> PathBuf {
    if let Some(dir) = std::env::var_os("TIDEGATE_GUEST_COMPONENTS") {
        return PathBuf::from(dir);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-components");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/build-guests.sh");
    let status = Command::new(&script)
        .arg(&dir)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} failed (it needs node, npm and python3 with venv)",
        script.display()
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_in_javascript_and_python_answers_text_and_binary_over_wss() {
    let dir = components();
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-artifacts");
    let gateway = Gateway::start(
        Options::default()
            .config(&format!(
                r#"
                [functions.echo-js]
                wasm = "{js}"
                [functions.echo-py]
                wasm = "{py}"
                [routes]
                "/js" = "echo-js"
                "/py" = "echo-py"
                "#,
                js = dir.join("echo-js.wasm").display(),
                py = dir.join("echo-py.wasm").display(),
            ))
            .env(
                "TIDEGATE__RUNTIME__ARTIFACT_DIR",
                artifacts.display().to_string(),
            ),
    );
    for route in ["/js", "/py"] {
        let mut client = gateway.connect(route).await;
        for message in [
            Message::Text(format!("hello from {route}").into()),
            Message::Text("ünïcödé ✓".into()),
            Message::Binary(vec![0, 1, 2, 255].into()),
        ] {
            assert_eq!(
                round_trip(&mut client, message.clone()).await,
                message,
                "{route}"
            );
        }
    }
    // Each message's copy names the function that handled it.
    let copies =
        crate::harness::drain_queue(&gateway.queue, 6, std::time::Duration::from_secs(10)).await;
    let functions: Vec<&str> = copies
        .iter()
        .filter_map(|c| c.headers.get("function").map(String::as_str))
        .collect();
    assert_eq!(functions.iter().filter(|f| **f == "echo-js").count(), 3);
    assert_eq!(functions.iter().filter(|f| **f == "echo-py").count(), 3);
}
