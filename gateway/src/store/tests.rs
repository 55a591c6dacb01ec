//! The catalog against real components: changes, refusals that change
//! nothing, and a restart.

use std::num::NonZeroU32;

use runtime::{RuntimeConfig, RuntimeMetrics};

use super::*;
use crate::router::{Entry, Router};

const ECHO: &[u8] = tidegate_functions::ECHO;

fn authorizer() -> Bytes {
    std::fs::read(tidegate_functions::AUTHORIZER_PATH)
        .expect("the authorizer component")
        .into()
}

/// A node's registry and routes, the config file defining function
/// `config-echo` and route `/` to it, and its catalog under `state`.
struct Node {
    catalog: Catalog,
    registry: Arc<Registry>,
    routes: Arc<RouteTable>,
    prometheus: prometheus::Registry,
    restored: Restored,
}

async fn start(state: &Path) -> Result<Node, RestoreError> {
    start_keeping(state, 16).await
}

/// [`start`], keeping at most `max_versions` versions of a function.
async fn start_keeping(state: &Path, max_versions: usize) -> Result<Node, RestoreError> {
    let prometheus = prometheus::Registry::new();
    let metrics = RuntimeMetrics::register(&prometheus).expect("metrics");
    let config = RuntimeConfig {
        artifact_dir: state.join("artifacts"),
        max_total_instances: NonZeroU32::new(8).unwrap(),
        ..RuntimeConfig::default()
    };
    let registry = Arc::new(Registry::new(config, metrics).expect("engine"));
    registry
        .load("config-echo", ECHO.to_vec())
        .await
        .expect("echo");
    let root = Route::new(RouteSpec {
        path: "/".into(),
        function: Some("config-echo".into()),
        ..RouteSpec::default()
    })
    .unwrap();
    let routes = Arc::new(RouteTable::new(Router::new([Entry {
        route: Arc::new(root),
        origin: Origin::Config,
    }])));
    let (catalog, restored) = Catalog::open(
        state,
        registry.clone(),
        routes.clone(),
        BTreeSet::from(["config-echo".to_owned()]),
        Limits {
            max_upload_size: 1 << 20,
            max_versions: NonZeroUsize::new(max_versions).unwrap(),
        },
    )
    .await?;
    Ok(Node {
        catalog,
        registry,
        routes,
        prometheus,
        restored,
    })
}

/// Another handler component: echo with a custom section appended (a
/// digest of its own, the same code).
fn echo_variant(tag: &str) -> Bytes {
    let mut wasm = ECHO.to_vec();
    let name = b"tidegate-test";
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(tag.as_bytes());
    wasm.push(0); // custom section id
    wasm.push(section.len() as u8);
    wasm.extend_from_slice(&section);
    wasm.into()
}

fn components(state: &Path) -> usize {
    std::fs::read_dir(state.join(disk::DIR).join("components"))
        .unwrap()
        .count()
}

fn spec(path: &str, function: &str) -> RouteSpec {
    RouteSpec {
        path: path.into(),
        function: Some(function.into()),
        ..RouteSpec::default()
    }
}

fn compiles(prometheus: &prometheus::Registry) -> u64 {
    prometheus
        .gather()
        .iter()
        .filter(|f| f.name() == "tidegate_function_compiles_total")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test]
async fn uploads_versions_and_routes_change_and_survive_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let node = start(state.path()).await.unwrap();
    assert_eq!(node.restored, Restored::default());
    let catalog = &node.catalog;

    let first = catalog.upload("chat", ECHO.into(), true).await.unwrap();
    assert!(first.created);
    let again = catalog.upload("chat", ECHO.into(), true).await.unwrap();
    assert!(!again.created, "the same component is the same version");
    let second = catalog.upload("chat", authorizer(), false).await.unwrap();
    assert!(second.created);
    assert_eq!(
        node.registry.get("chat").unwrap().version(),
        first.function.version(),
        "?live=false"
    );
    catalog
        .set_live("chat", second.function.version())
        .await
        .unwrap();
    assert_eq!(
        node.registry.get("chat").unwrap().version(),
        second.function.version()
    );
    assert!(catalog.put_route(spec("/chat", "chat")).await.unwrap());
    assert!(!catalog.put_route(spec("/chat", "chat")).await.unwrap());
    catalog.upload("spare", ECHO.into(), true).await.unwrap();
    catalog.remove_function("spare").await.unwrap();
    drop(node);

    // A restart: everything is back, and nothing is compiled again.
    let node = start(state.path()).await.unwrap();
    assert_eq!(
        node.restored,
        Restored {
            functions: 1,
            versions: 2,
            routes: 1
        }
    );
    assert_eq!(
        node.registry.get("chat").unwrap().version(),
        second.function.version()
    );
    assert_eq!(
        compiles(&node.prometheus),
        0,
        "every artifact is reused, the config file's function's too"
    );
    let route = node.routes.resolve("/chat/x").unwrap();
    assert_eq!(route.connect(), Some("chat"));
    // The component of the deleted function is gone from the disk.
    let components = std::fs::read_dir(state.path().join(disk::DIR).join("components"))
        .unwrap()
        .count();
    assert_eq!(components, 2);

    // Rolled back, the first version's code is loaded again.
    node.catalog
        .set_live("chat", first.function.version())
        .await
        .unwrap();
    assert!(node.registry.get("chat").unwrap().is_loaded());
    node.catalog
        .remove_version("chat", second.function.version())
        .await
        .unwrap();
    assert_eq!(node.registry.versions("chat").unwrap().len(), 1);
}

#[tokio::test]
async fn refused_changes_change_nothing() {
    let state = tempfile::tempdir().unwrap();
    let node = start(state.path()).await.unwrap();
    let catalog = &node.catalog;
    let index_before = std::fs::read(state.path().join("functions/index.json")).ok();

    for (name, wasm) in [
        ("Bad_Name", Bytes::from_static(ECHO)),
        ("config-echo", Bytes::from_static(ECHO)),
        ("f", Bytes::from_static(b"not wasm")),
        ("f", Bytes::from(vec![0u8; (1 << 20) + 1])),
    ] {
        let error = catalog.upload(name, wasm, true).await.err().unwrap();
        assert!(
            matches!(
                error,
                CatalogError::BadName(_)
                    | CatalogError::ConfigFunction(_)
                    | CatalogError::Invalid(_)
                    | CatalogError::TooLarge { .. }
            ),
            "{error}"
        );
    }
    assert!(matches!(
        catalog.remove_function("config-echo").await,
        Err(CatalogError::ConfigFunction(_))
    ));
    assert!(matches!(
        catalog.put_route(spec("/x", "nope")).await,
        Err(CatalogError::MissingFunction { .. })
    ));
    assert!(matches!(
        catalog.put_route(spec("/", "config-echo")).await,
        Err(CatalogError::Route(TableError::FromConfig(_)))
    ));
    assert!(matches!(
        catalog.remove_route("/").await,
        Err(CatalogError::Route(TableError::FromConfig(_)))
    ));
    assert!(matches!(
        catalog.remove_route("/none").await,
        Err(CatalogError::Route(TableError::NotFound(_)))
    ));
    assert_eq!(
        std::fs::read(state.path().join("functions/index.json")).ok(),
        index_before
    );
    assert_eq!(node.registry.list().len(), 1, "only the config function");
    let series_of_f = node
        .prometheus
        .gather()
        .iter()
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            metric
                .get_label()
                .iter()
                .any(|label| label.name() == "function" && label.value() == "f")
        })
        .count();
    assert_eq!(series_of_f, 0, "a refused upload leaves no metric series");

    let live = catalog.upload("chat", ECHO.into(), true).await.unwrap();
    catalog.put_route(spec("/chat", "chat")).await.unwrap();
    let error = catalog.remove_function("chat").await.unwrap_err();
    assert!(error.to_string().contains("/chat"), "{error}");
    let error = catalog
        .remove_version("chat", live.function.version())
        .await
        .unwrap_err();
    assert!(
        matches!(error, CatalogError::Version(VersionError::Live { .. })),
        "{error}"
    );
    catalog.remove_route("/chat").await.unwrap();
    catalog.remove_function("chat").await.unwrap();
}

#[tokio::test]
async fn a_damaged_catalog_stops_start_up_naming_the_file() {
    let state = tempfile::tempdir().unwrap();
    let node = start(state.path()).await.unwrap();
    let uploaded = node
        .catalog
        .upload("chat", ECHO.into(), true)
        .await
        .unwrap();
    drop(node);
    let component = state
        .path()
        .join("functions/components")
        .join(format!("{}.wasm", uploaded.function.digest()));
    std::fs::remove_file(&component).unwrap();
    let error = start(state.path()).await.err().unwrap().to_string();
    assert!(
        error.contains(&component.display().to_string()) && error.contains("missing"),
        "{error}"
    );
    let index = state.path().join("functions/index.json");
    std::fs::write(&index, "{").unwrap();
    let error = start(state.path()).await.err().unwrap().to_string();
    assert!(error.contains(&index.display().to_string()), "{error}");
}

#[tokio::test]
async fn a_function_keeps_its_newest_versions_and_the_live_one() {
    let state = tempfile::tempdir().unwrap();
    let node = start_keeping(state.path(), 3).await.unwrap();
    let catalog = &node.catalog;
    let mut versions = Vec::new();
    let mut pruned = Vec::new();
    for (n, live) in [(1, true), (2, false), (3, false), (4, false), (5, false)] {
        let uploaded = catalog
            .upload("f", echo_variant(&n.to_string()), live)
            .await
            .unwrap();
        versions.push(uploaded.function.version().to_owned());
        pruned.push(uploaded.pruned);
    }
    // The live first version stays; the oldest of the others go.
    assert_eq!(
        pruned,
        vec![
            vec![],
            vec![],
            vec![],
            vec![versions[1].clone()],
            vec![versions[2].clone()]
        ]
    );
    let kept: Vec<String> = node
        .registry
        .versions("f")
        .unwrap()
        .iter()
        .map(|v| v.function.version().to_owned())
        .collect();
    assert_eq!(
        kept,
        vec![
            versions[0].clone(),
            versions[3].clone(),
            versions[4].clone()
        ]
    );
    assert_eq!(components(state.path()), 3, "pruned components are deleted");
    drop(node);
    let node = start_keeping(state.path(), 3).await.unwrap();
    assert_eq!(node.restored.versions, 3);
}

#[tokio::test]
async fn a_version_is_kept_on_disk_not_in_memory_and_compiles_from_there() {
    let state = tempfile::tempdir().unwrap();
    let node = start(state.path()).await.unwrap();
    let catalog = &node.catalog;
    catalog.upload("f", echo_variant("1"), true).await.unwrap();
    let second = catalog.upload("f", echo_variant("2"), false).await.unwrap();
    let version = second.function.version().to_owned();
    assert_eq!(second.function.size(), echo_variant("2").len());

    // Its artifact gone, it compiles again from the component on disk.
    std::fs::remove_dir_all(state.path().join("artifacts")).unwrap();
    std::fs::create_dir(state.path().join("artifacts")).unwrap();
    catalog.set_live("f", &version).await.unwrap();
    assert!(node.registry.get("f").unwrap().is_loaded());

    // Both gone: the switch is refused, and nothing changes.
    catalog.set_live("f", &not_live(&node)).await.unwrap();
    let index = std::fs::read(state.path().join("functions/index.json")).unwrap();
    std::fs::remove_dir_all(state.path().join("artifacts")).unwrap();
    std::fs::create_dir(state.path().join("artifacts")).unwrap();
    std::fs::remove_file(
        state
            .path()
            .join("functions/components")
            .join(format!("{}.wasm", second.function.digest())),
    )
    .unwrap();
    node.registry.scale_down();
    let Err(error) = catalog.set_live("f", &version).await else {
        panic!("made live without its code");
    };
    assert!(matches!(error, CatalogError::Unloadable { .. }), "{error}");
    assert!(error.to_string().contains("cannot be read"), "{error}");
    assert_ne!(node.registry.get("f").unwrap().version(), version);
    assert_eq!(
        std::fs::read(state.path().join("functions/index.json")).unwrap(),
        index
    );
}

/// The version of `f` that is not live.
fn not_live(node: &Node) -> String {
    node.registry
        .versions("f")
        .unwrap()
        .iter()
        .find(|v| !v.live)
        .unwrap()
        .function
        .version()
        .to_owned()
}

#[tokio::test]
async fn deleting_the_last_version_deletes_the_function() {
    let state = tempfile::tempdir().unwrap();
    let node = start(state.path()).await.unwrap();
    let only = node
        .catalog
        .upload("f", echo_variant("only"), false)
        .await
        .unwrap();
    node.catalog
        .remove_version("f", only.function.version())
        .await
        .unwrap();
    assert!(node.registry.versions("f").is_none());
    drop(node);
    let node = start(state.path()).await.unwrap();
    assert!(node.registry.versions("f").is_none());
    assert_eq!(node.restored.functions, 0);

    // An index an earlier build left with a function of no versions.
    drop(node);
    let index = state.path().join("functions/index.json");
    let mut text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    text["functions"]["empty"] = serde_json::json!({"versions": []});
    std::fs::write(&index, serde_json::to_vec(&text).unwrap()).unwrap();
    let node = start(state.path()).await.unwrap();
    assert!(node.registry.versions("empty").is_none());
    // Uploading under its name works as for a new function.
    node.catalog
        .upload("empty", echo_variant("again"), true)
        .await
        .unwrap();
}

#[test]
fn a_version_of_another_component_with_the_same_16_digits_is_refused() {
    let digest = format!("{}{}", "ab".repeat(8), "00".repeat(24));
    let other = format!("{}{}", "ab".repeat(8), "11".repeat(24));
    let unrelated = "cd".repeat(32);
    assert!(check_clash("f", &digest, [unrelated.clone(), digest.clone()]).is_ok());
    let error = check_clash("f", &digest, [unrelated, other]).unwrap_err();
    assert!(
        matches!(&error, CatalogError::VersionClash { version, .. } if version == &"ab".repeat(8)),
        "{error}"
    );
}

#[tokio::test]
async fn the_version_rolled_back_to_is_not_pruned_by_the_next_deploy() {
    let state = tempfile::tempdir().unwrap();
    let node = start_keeping(state.path(), 2).await.unwrap();
    let catalog = &node.catalog;
    let first = catalog.upload("f", echo_variant("1"), true).await.unwrap();
    let second = catalog.upload("f", echo_variant("2"), true).await.unwrap();
    // Rolled back to the first, then a new deploy: the first (live until
    // then) stays to roll back to; the second goes.
    catalog
        .set_live("f", first.function.version())
        .await
        .unwrap();
    let third = catalog.upload("f", echo_variant("3"), true).await.unwrap();
    assert_eq!(third.pruned, vec![second.function.version().to_owned()]);
    assert!(
        node.registry
            .version("f", first.function.version())
            .is_some()
    );
}

#[tokio::test]
async fn catching_up_compiles_only_what_ends_live_and_survives_a_restart_in_the_middle() {
    let state = tempfile::tempdir().unwrap();
    let node = start(state.path()).await.unwrap();
    assert!(
        node.catalog.catching_up().await,
        "a new node has read nothing"
    );
    let before = compiles(&node.prometheus);
    node.catalog.catch_up().await.unwrap();
    let first = node
        .catalog
        .apply(Change::Upload {
            name: "f".into(),
            live: true,
            wasm: echo_variant("first"),
        })
        .await
        .unwrap();
    node.catalog.set_log_offset(0).await.unwrap();
    let Applied::Uploaded(second) = node
        .catalog
        .apply(Change::Upload {
            name: "f".into(),
            live: true,
            wasm: echo_variant("second"),
        })
        .await
        .unwrap()
    else {
        panic!("an upload");
    };
    node.catalog.set_log_offset(1).await.unwrap();
    assert_eq!(compiles(&node.prometheus), before, "nothing compiled yet");
    let Applied::Uploaded(first) = first else {
        panic!("an upload");
    };
    assert!(!second.function.is_loaded());
    drop(node);

    // Stopped in the middle: still catching up after a restart, although
    // it has a position in the log.
    let node = start(state.path()).await.unwrap();
    assert!(node.catalog.catching_up().await);
    assert!(
        !node.registry.get("f").unwrap().is_loaded(),
        "what was live mid-history is not compiled at the restart"
    );
    node.catalog.catch_up().await.unwrap();
    node.catalog
        .apply(Change::SetLive {
            name: "f".into(),
            version: first.function.version().into(),
        })
        .await
        .unwrap();
    node.catalog.caught_up().await;
    assert!(!node.catalog.catching_up().await);
    let live = node.registry.get("f").unwrap();
    assert_eq!(live.version(), first.function.version());
    assert!(live.is_loaded(), "the live version is compiled at the end");
    drop(node);
    let node = start(state.path()).await.unwrap();
    assert!(!node.catalog.catching_up().await, "caught up, and noted");
}
