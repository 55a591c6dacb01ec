//! Routes: which functions serve a request path, and, per message, which
//! of a route's functions handles it.
//!
//! A route is the API Gateway model on a path: a `connect` function (its
//! `on-connect` admits or refuses the client), a `disconnect` function, a
//! `default` function for messages, and optionally a *selection
//! expression* (`$request.body.action`) whose value in a JSON text message
//! picks one of the route's `routes` instead of the default. The short
//! form `{"path": "/chat", "function": "chat"}` is one function for every
//! event.
//!
//! The table of routes ([`RouteTable`]) changes at run time (the
//! management API); a connection keeps the [`Route`] it was admitted on,
//! and looks up the live version of the route's functions for each event.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use runtime::Payload;

/// The longest route path, in bytes.
pub const MAX_PATH_LEN: usize = 256;

/// Most route keys in one route.
pub const MAX_ROUTE_KEYS: usize = 256;

/// Longest route key (a value of the selection expression), in bytes.
pub const MAX_ROUTE_KEY_LEN: usize = 128;

/// The prefix of every selection expression.
const SELECTION_PREFIX: &str = "$request.body.";

/// A route as written: in the config file, in `PUT /v1/routes`, in
/// `GET /v1/routes`. Either the short form (`function`) or the long form
/// (`connect`, `disconnect`, `default`, `selection`, `routes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The request path the route serves (and every path below it).
    pub path: String,
    /// Short form: the function for every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// The function whose `on-connect` admits clients; without one every
    /// client that passes authentication is admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    /// The function whose `on-disconnect` runs when a connection ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<String>,
    /// The function for messages no route key selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Where the route key is read: `$request.body.<field>[.<field>...]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<String>,
    /// Route key to function.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, String>,
}

/// Why a route spec is refused: the field at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RouteError {
    /// The field at fault (`path`, `selection`, `routes.join`, ...).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn route_error(field: impl Into<String>, message: impl Into<String>) -> RouteError {
    RouteError {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `name` is a function name: `[a-z0-9][a-z0-9-]*`, at most 63
/// characters (a DNS label, so it fits in paths, metric labels and queue
/// headers unchanged).
pub fn is_function_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0] != b'-'
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A route's path: starts with '/', no query or fragment, no trailing '/'
/// (except "/" itself), no empty, `.` or `..` segment, printable ASCII.
///
/// # Errors
/// A message saying what is wrong.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("a route is a path starting with '/'".into());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("a route is at most {MAX_PATH_LEN} bytes"));
    }
    if path.contains(['?', '#']) {
        return Err("a route is a path, without query or fragment".into());
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a route is printable ASCII, without spaces".into());
    }
    if path.len() > 1 && path.ends_with('/') {
        return Err("a route must not end with '/' (except \"/\" itself)".into());
    }
    if path.len() > 1
        && path[1..]
            .split('/')
            .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err("a route has no empty, '.' or '..' segment".into());
    }
    Ok(())
}

/// A field path in a JSON message: `$request.body.action` is `["action"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The expression as written.
    expression: String,
    /// The fields, outermost first.
    fields: Vec<String>,
}

impl Selection {
    /// Parse `$request.body.<field>[.<field>...]`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(expression: &str) -> Result<Self, String> {
        let Some(rest) = expression.strip_prefix(SELECTION_PREFIX) else {
            return Err(format!(
                "a selection expression reads a field of a JSON message: \
                 {SELECTION_PREFIX}<field>, e.g. $request.body.action"
            ));
        };
        let fields: Vec<String> = rest.split('.').map(str::to_owned).collect();
        if fields.len() > 8
            || fields
                .iter()
                .any(|f| f.is_empty() || f.len() > 64 || !f.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(
                "fields are non-empty, at most 64 printable characters each, at most 8 deep".into(),
            );
        }
        Ok(Self {
            expression: expression.to_owned(),
            fields,
        })
    }

    /// The route key in `text`: the selected field when the message is a
    /// JSON object and the field is a string.
    pub fn key<'a>(&self, value: &'a serde_json::Value) -> Option<&'a str> {
        let mut value = value;
        for field in &self.fields {
            value = value.as_object()?.get(field)?;
        }
        value.as_str()
    }
}

/// A validated route: which function serves each event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The spec it was built from, as given (for listing).
    spec: RouteSpec,
    /// Its path, shared by its connections (metric labels, copies' headers).
    shared_path: Arc<str>,
    /// The function whose `on-connect` admits clients.
    connect: Option<String>,
    /// The function whose `on-disconnect` runs.
    disconnect: Option<String>,
    /// The function for unselected messages.
    default: Option<String>,
    /// Where the route key is read.
    selection: Option<Selection>,
    /// Route key to function.
    routes: BTreeMap<String, String>,
}

/// The function for a message, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick<'a> {
    /// This function handles it.
    Function(&'a str),
    /// No route key matched and the route has no default.
    NoRoute,
}

impl Route {
    /// Validate a spec: a plain path, either form but not both, function
    /// names that are names, a selection when there are route keys.
    ///
    /// # Errors
    /// A [`RouteError`] naming the field at fault.
    pub fn new(spec: RouteSpec) -> Result<Self, RouteError> {
        check_path(&spec.path).map_err(|m| route_error("path", m))?;
        let check_name = |field: &str, name: &str| {
            if is_function_name(name) {
                Ok(())
            } else {
                Err(route_error(
                    field,
                    format!(
                        "{name:?} is not a function name: [a-z0-9][a-z0-9-]*, at most 63 characters"
                    ),
                ))
            }
        };
        let long_form = spec.connect.is_some()
            || spec.disconnect.is_some()
            || spec.default.is_some()
            || spec.selection.is_some()
            || !spec.routes.is_empty();
        if let Some(function) = &spec.function {
            if long_form {
                return Err(route_error(
                    "function",
                    "give either \"function\" (one function for every event) or the long form \
                     (connect, disconnect, default, selection, routes), not both",
                ));
            }
            check_name("function", function)?;
            return Ok(Self {
                shared_path: Arc::from(spec.path.as_str()),
                connect: Some(function.clone()),
                disconnect: Some(function.clone()),
                default: Some(function.clone()),
                selection: None,
                routes: BTreeMap::new(),
                spec,
            });
        }
        if spec.default.is_none() && spec.routes.is_empty() {
            return Err(route_error(
                "function",
                "a route needs a function: \"function\", or \"default\" and/or \"routes\"",
            ));
        }
        for (field, name) in [
            ("connect", &spec.connect),
            ("disconnect", &spec.disconnect),
            ("default", &spec.default),
        ] {
            if let Some(name) = name {
                check_name(field, name)?;
            }
        }
        if spec.routes.len() > MAX_ROUTE_KEYS {
            return Err(route_error(
                "routes",
                format!("at most {MAX_ROUTE_KEYS} route keys"),
            ));
        }
        for (key, name) in &spec.routes {
            if key.is_empty() || key.len() > MAX_ROUTE_KEY_LEN {
                return Err(route_error(
                    format!("routes.{key}"),
                    format!("a route key is 1 to {MAX_ROUTE_KEY_LEN} bytes"),
                ));
            }
            check_name(&format!("routes.{key}"), name)?;
        }
        let selection = match (&spec.selection, spec.routes.is_empty()) {
            (Some(expression), false) => {
                Some(Selection::parse(expression).map_err(|m| route_error("selection", m))?)
            }
            (None, false) => {
                return Err(route_error(
                    "selection",
                    "route keys need a selection expression, e.g. \"$request.body.action\"",
                ));
            }
            (Some(_), true) => {
                return Err(route_error(
                    "routes",
                    "a selection expression without route keys selects nothing: add \"routes\" \
                     or drop \"selection\"",
                ));
            }
            (None, true) => None,
        };
        Ok(Self {
            shared_path: Arc::from(spec.path.as_str()),
            connect: spec.connect.clone(),
            disconnect: spec.disconnect.clone(),
            default: spec.default.clone(),
            routes: spec.routes.clone(),
            selection,
            spec,
        })
    }

    /// The route's path.
    pub fn path(&self) -> &str {
        &self.spec.path
    }

    /// The route's path, shared.
    pub fn shared_path(&self) -> &Arc<str> {
        &self.shared_path
    }

    /// The spec, as given.
    pub fn spec(&self) -> &RouteSpec {
        &self.spec
    }

    /// The function whose `on-connect` admits clients, if any.
    pub fn connect(&self) -> Option<&str> {
        self.connect.as_deref()
    }

    /// The function whose `on-disconnect` runs, if any.
    pub fn disconnect(&self) -> Option<&str> {
        self.disconnect.as_deref()
    }

    /// Every function the route names, each once.
    pub fn functions(&self) -> Vec<&str> {
        let mut names: Vec<&str> = [&self.connect, &self.disconnect, &self.default]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .chain(self.routes.values().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The function for `message`: the one its route key selects, else the
    /// default. Only a text message that is a JSON object is read, and only
    /// when the route has route keys.
    pub fn pick(&self, message: &Payload) -> Pick<'_> {
        if let (Some(selection), Payload::Text(text)) = (&self.selection, message)
            && let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
            && let Some(function) = selection.key(&value).and_then(|key| self.routes.get(key))
        {
            return Pick::Function(function);
        }
        match &self.default {
            Some(function) => Pick::Function(function),
            None => Pick::NoRoute,
        }
    }
}

/// Where a route was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The config file: changed only by editing it.
    Config,
    /// The management API.
    Api,
}

/// Why a change to the table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The route is defined in the config file.
    #[error("the route {0} is defined in the config file and cannot be changed through the API")]
    FromConfig(String),
    /// No route has that path.
    #[error("no route has the path {0}")]
    NotFound(String),
}

/// One entry of the table.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The route.
    pub route: Arc<Route>,
    /// Where it was defined.
    pub origin: Origin,
}

/// Routes by path, longest first: a route matches its own path and every
/// path below it (`/chat` matches `/chat` and `/chat/room-1`, not
/// `/chatter`); the longest matching route wins, and `/` matches anything.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Longest path first.
    entries: Vec<Entry>,
}

impl Router {
    /// A router of `routes`.
    pub fn new(routes: impl IntoIterator<Item = Entry>) -> Self {
        let mut router = Self::default();
        for entry in routes {
            router.insert(entry);
        }
        router
    }

    fn insert(&mut self, entry: Entry) {
        self.entries
            .retain(|other| other.route.path() != entry.route.path());
        self.entries.push(entry);
        self.entries.sort_by(|a, b| {
            let (a, b) = (a.route.path(), b.route.path());
            b.len().cmp(&a.len()).then_with(|| a.cmp(b))
        });
    }

    /// The route serving `path` (without query string), if any. A path
    /// must start with '/'.
    pub fn resolve(&self, path: &str) -> Option<&Arc<Route>> {
        if !path.starts_with('/') {
            return None;
        }
        self.entries.iter().map(|entry| &entry.route).find(|route| {
            let route = route.path();
            route == "/"
                || path == route
                || (path.starts_with(route) && path.as_bytes().get(route.len()) == Some(&b'/'))
        })
    }

    /// Every route, longest path first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

/// The routes of this node, changed at run time: readers take a snapshot
/// (one lock and a reference count per upgrade), writers replace it.
#[derive(Default)]
pub struct RouteTable {
    current: RwLock<Arc<Router>>,
    /// Routes replaced or removed while connections admitted on them may
    /// still be open: their functions are still in use.
    retired: std::sync::Mutex<Vec<std::sync::Weak<Route>>>,
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.snapshot().entries.len())
            .finish()
    }
}

impl RouteTable {
    /// A table holding `router`.
    pub fn new(router: Router) -> Self {
        Self {
            current: RwLock::new(Arc::new(router)),
            retired: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The routes now.
    pub fn snapshot(&self) -> Arc<Router> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The route serving `path` now.
    pub fn resolve(&self, path: &str) -> Option<Arc<Route>> {
        self.snapshot().resolve(path).cloned()
    }

    /// Add or replace the API route at `route.path()`; returns the route it
    /// replaced, if any.
    ///
    /// # Errors
    /// [`TableError::FromConfig`] when the config file defines that path.
    pub fn put(&self, route: Route) -> Result<Option<Arc<Route>>, TableError> {
        let previous = self.change(|router| {
            let previous = router
                .entries
                .iter()
                .find(|entry| entry.route.path() == route.path());
            let previous = match previous {
                Some(entry) if entry.origin == Origin::Config => {
                    return Err(TableError::FromConfig(route.path().to_owned()));
                }
                Some(entry) => Some(entry.route.clone()),
                None => None,
            };
            router.insert(Entry {
                route: Arc::new(route),
                origin: Origin::Api,
            });
            Ok(previous)
        })?;
        if let Some(previous) = &previous {
            self.retire(previous);
        }
        Ok(previous)
    }

    /// Remove the API route at `path`.
    ///
    /// # Errors
    /// [`TableError::NotFound`] when no route has that path,
    /// [`TableError::FromConfig`] when the config file defines it.
    pub fn remove(&self, path: &str) -> Result<Arc<Route>, TableError> {
        let removed = self.change(|router| {
            let Some(index) = router
                .entries
                .iter()
                .position(|entry| entry.route.path() == path)
            else {
                return Err(TableError::NotFound(path.to_owned()));
            };
            if router.entries[index].origin == Origin::Config {
                return Err(TableError::FromConfig(path.to_owned()));
            }
            Ok(router.entries.remove(index).route)
        })?;
        self.retire(&removed);
        Ok(removed)
    }

    /// The paths of the routes that name `function`, including routes
    /// replaced or removed that open connections still use.
    pub fn using(&self, function: &str) -> Vec<String> {
        let mut paths: Vec<String> = self
            .snapshot()
            .entries
            .iter()
            .filter(|entry| entry.route.functions().contains(&function))
            .map(|entry| entry.route.path().to_owned())
            .collect();
        let mut retired = self.retired();
        retired.retain(|route| route.strong_count() > 0);
        paths.extend(
            retired
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .filter(|route| route.functions().contains(&function))
                .map(|route| {
                    format!(
                        "{} (an earlier version of the route, still used by open connections)",
                        route.path()
                    )
                }),
        );
        paths
    }

    /// Keep track of `route` while connections hold it.
    fn retire(&self, route: &Arc<Route>) {
        let mut retired = self.retired();
        retired.retain(|route| route.strong_count() > 0);
        retired.push(Arc::downgrade(route));
    }

    fn retired(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Weak<Route>>> {
        self.retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn change<T>(
        &self,
        change: impl FnOnce(&mut Router) -> Result<T, TableError>,
    ) -> Result<T, TableError> {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut router = Router::clone(&current);
        let outcome = change(&mut router)?;
        *current = Arc::new(router);
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(path: &str, function: &str) -> Entry {
        Entry {
            route: Arc::new(
                Route::new(RouteSpec {
                    path: path.into(),
                    function: Some(function.into()),
                    ..RouteSpec::default()
                })
                .unwrap(),
            ),
            origin: Origin::Config,
        }
    }

    fn router(routes: &[(&str, &str)]) -> Router {
        Router::new(routes.iter().map(|(p, f)| short(p, f)))
    }

    fn long(json: serde_json::Value) -> Result<Route, RouteError> {
        Route::new(serde_json::from_value(json).unwrap())
    }

    #[test]
    fn longest_route_wins_and_matches_whole_segments() {
        let router = router(&[("/", "echo"), ("/chat", "chat"), ("/chat/admin", "admin")]);
        let function = |path| router.resolve(path).and_then(|r| r.connect());
        assert_eq!(function("/"), Some("echo"));
        assert_eq!(function("/chat"), Some("chat"));
        assert_eq!(function("/chat/room-1"), Some("chat"));
        assert_eq!(function("/chat/admin/x"), Some("admin"));
        assert_eq!(function("/chatter"), Some("echo"));
        assert_eq!(
            router.resolve("/chat/room-1").map(|r| r.path()),
            Some("/chat")
        );
    }

    #[test]
    fn without_a_root_route_unknown_paths_do_not_match() {
        let router = router(&[("/chat", "chat")]);
        assert!(router.resolve("/other").is_none());
        assert!(router.resolve("/chatter").is_none());
        assert!(router.resolve("/chat").is_some());
    }

    #[test]
    fn a_path_without_a_leading_slash_matches_nothing() {
        let router = router(&[("/", "echo")]);
        assert!(router.resolve("chat").is_none());
        assert!(router.resolve("").is_none());
        assert_eq!(router.resolve("/x").map(|r| r.path()), Some("/"));
    }

    #[test]
    fn the_selection_picks_a_route_key_and_the_rest_goes_to_the_default() {
        let route = long(serde_json::json!({
            "path": "/chat", "connect": "auth", "disconnect": "chat", "default": "chat",
            "selection": "$request.body.action",
            "routes": {"join": "chat-join", "send": "chat-send"},
        }))
        .unwrap();
        let pick = |text: &str| route.pick(&Payload::Text(text.into()));
        assert_eq!(pick(r#"{"action":"join"}"#), Pick::Function("chat-join"));
        assert_eq!(
            pick(r#"{"action":"send","x":1}"#),
            Pick::Function("chat-send")
        );
        assert_eq!(pick(r#"{"action":"other"}"#), Pick::Function("chat"));
        assert_eq!(pick(r#"{"action":7}"#), Pick::Function("chat"));
        assert_eq!(pick("not json"), Pick::Function("chat"));
        assert_eq!(pick(r#"["join"]"#), Pick::Function("chat"));
        assert_eq!(
            route.pick(&Payload::Binary(br#"{"action":"join"}"#.to_vec())),
            Pick::Function("chat"),
            "binary messages are not read"
        );
        assert_eq!(route.connect(), Some("auth"));
        assert_eq!(
            route.functions(),
            vec!["auth", "chat", "chat-join", "chat-send"]
        );
    }

    #[test]
    fn nested_fields_are_selected_and_without_a_default_there_is_no_route() {
        let route = long(serde_json::json!({
            "path": "/x", "selection": "$request.body.meta.kind", "routes": {"a": "fa"},
        }))
        .unwrap();
        let pick = |text: &str| route.pick(&Payload::Text(text.into()));
        assert_eq!(pick(r#"{"meta":{"kind":"a"}}"#), Pick::Function("fa"));
        assert_eq!(pick(r#"{"kind":"a"}"#), Pick::NoRoute);
        assert_eq!(route.connect(), None);
    }

    #[test]
    fn conflicting_or_incomplete_specs_are_refused_with_the_field() {
        let field = |json| long(json).unwrap_err().field;
        assert_eq!(
            field(serde_json::json!({"path": "/c", "function": "a", "default": "b"})),
            "function"
        );
        assert_eq!(field(serde_json::json!({"path": "/c"})), "function");
        assert_eq!(
            field(serde_json::json!({"path": "/c", "routes": {"a": "b"}})),
            "selection"
        );
        assert_eq!(
            field(
                serde_json::json!({"path": "/c", "default": "b", "selection": "$request.body.a"})
            ),
            "routes"
        );
        assert_eq!(
            field(
                serde_json::json!({"path": "/c", "default": "b", "selection": "body.a",
                "routes": {"a": "b"}})
            ),
            "selection"
        );
        assert_eq!(
            field(serde_json::json!({"path": "c", "function": "a"})),
            "path"
        );
        assert_eq!(
            field(serde_json::json!({"path": "/c/", "function": "a"})),
            "path"
        );
        assert_eq!(
            field(serde_json::json!({"path": "/c/../d", "function": "a"})),
            "path"
        );
        assert_eq!(
            field(serde_json::json!({"path": "/c", "function": "Chat"})),
            "function"
        );
        assert_eq!(
            field(
                serde_json::json!({"path": "/c", "default": "a", "selection": "$request.body.a",
                "routes": {"k": "no_underscores"}})
            ),
            "routes.k"
        );
        let unknown = serde_json::from_value::<RouteSpec>(
            serde_json::json!({"path": "/c", "function": "a", "fucntion": "b"}),
        );
        assert!(unknown.is_err(), "unknown fields are refused");
    }

    #[test]
    fn function_names_are_dns_labels() {
        for good in ["echo", "a", "chat-2", "0x", &"a".repeat(63)] {
            assert!(is_function_name(good), "{good}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "a b", &"a".repeat(64)] {
            assert!(!is_function_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_table_keeps_config_routes_and_changes_api_routes() {
        let table = RouteTable::new(router(&[("/", "echo")]));
        let chat = |function: &str| {
            Route::new(RouteSpec {
                path: "/chat".into(),
                function: Some(function.into()),
                ..RouteSpec::default()
            })
            .unwrap()
        };
        assert_eq!(table.put(chat("chat")).unwrap(), None);
        assert_eq!(
            table
                .resolve("/chat/x")
                .and_then(|r| r.connect().map(str::to_owned)),
            Some("chat".into())
        );
        let replaced = table.put(chat("chat-2")).unwrap().unwrap();
        assert_eq!(replaced.connect(), Some("chat"));
        assert_eq!(table.using("chat-2"), vec!["/chat".to_owned()]);
        assert_eq!(table.using("echo"), vec!["/".to_owned()]);
        let root = Route::new(RouteSpec {
            path: "/".into(),
            function: Some("x".into()),
            ..RouteSpec::default()
        })
        .unwrap();
        assert_eq!(table.put(root), Err(TableError::FromConfig("/".into())));
        assert_eq!(table.remove("/"), Err(TableError::FromConfig("/".into())));
        assert_eq!(
            table.remove("/nope").unwrap_err(),
            TableError::NotFound("/nope".into())
        );
        table.remove("/chat").unwrap();
        assert_eq!(
            table.resolve("/chat").map(|r| r.path().to_owned()),
            Some("/".into())
        );
    }
}
