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
        1 << 20,
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
