//! What the tests of example functions share: a registry that keeps its
//! compiled code between runs, and the connection and context the gateway
//! would pass.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use runtime::{Connection, Context, Function, Registry, RuntimeConfig, RuntimeMetrics};
use tokio::sync::Mutex;

/// A registry whose precompiled artifacts are kept in `artifacts`, a
/// directory of the target's scratch space: each component is compiled
/// once, and every later load, in this run or the next, reads the artifact
/// while the component is unchanged.
pub fn registry(artifacts: &str) -> Registry {
    let config = RuntimeConfig {
        artifact_dir: Path::new(env!("CARGO_TARGET_TMPDIR")).join(artifacts),
        max_total_instances: NonZeroU32::new(8).unwrap(),
        ..RuntimeConfig::default()
    };
    let metrics = RuntimeMetrics::register(&prometheus::Registry::new()).expect("metrics");
    Registry::new(config, metrics).expect("engine")
}

/// Held while a component loads, so that tests running in parallel wait
/// for the first one's artifact instead of compiling the same code again.
static LOADING: Mutex<()> = Mutex::const_new(());

/// Load the component at `path` as function `name`.
pub async fn load(registry: &Registry, name: &str, path: impl AsRef<Path>) -> Arc<Function> {
    let path = path.as_ref();
    let wasm = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let _one_at_a_time = LOADING.lock().await;
    registry
        .load(name, wasm)
        .await
        .unwrap_or_else(|e| panic!("{name} loads: {e}"))
}

/// What `on-message` and `on-disconnect` get for connection `id` on `/chat`.
pub fn context(id: &str, claims: &[(&str, &str)]) -> Context {
    Context {
        id: id.into(),
        route: "/chat".into(),
        claims: pairs(claims),
        state: None,
    }
}

/// What `on-connect` gets for a client of `/chat` with this query string.
pub fn connection(query: &[(&str, &str)]) -> Connection {
    Connection {
        id: "node-1.conn-7".into(),
        route: "/chat".into(),
        path: "/chat".into(),
        query: pairs(query),
        headers: vec![],
        subprotocol: None,
        remote_addr: "127.0.0.1:50000".into(),
        claims: vec![],
        state: None,
    }
}

fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}
