//! Routes: which function serves a request path.

use std::collections::BTreeMap;

/// Route paths to function names. A route matches its own path and every
/// path below it (`/chat` matches `/chat` and `/chat/room-1`, not
/// `/chatter`); the longest matching route wins, and `/` matches anything.
#[derive(Debug, Clone)]
pub struct Router {
    /// `(route, function)`, longest route first.
    routes: Vec<(String, String)>,
}

/// A matched route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch<'a> {
    /// The route as configured, e.g. `/chat`.
    pub route: &'a str,
    /// The function serving it.
    pub function: &'a str,
}

impl Router {
    /// Build from the validated `routes` section.
    pub fn new(routes: &BTreeMap<String, String>) -> Self {
        let mut routes: Vec<(String, String)> = routes
            .iter()
            .map(|(path, function)| (path.clone(), function.clone()))
            .collect();
        routes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self { routes }
    }

    /// The route serving `path` (without query string), if any. A path
    /// must start with '/'.
    pub fn resolve(&self, path: &str) -> Option<RouteMatch<'_>> {
        if !path.starts_with('/') {
            return None;
        }
        self.routes
            .iter()
            .find(|(route, _)| {
                route == "/"
                    || path == route
                    || (path.starts_with(route.as_str())
                        && path.as_bytes().get(route.len()) == Some(&b'/'))
            })
            .map(|(route, function)| RouteMatch { route, function })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, &str)]) -> Router {
        Router::new(
            &routes
                .iter()
                .map(|(p, f)| (p.to_string(), f.to_string()))
                .collect(),
        )
    }

    #[test]
    fn longest_route_wins_and_matches_whole_segments() {
        let router = router(&[("/", "echo"), ("/chat", "chat"), ("/chat/admin", "admin")]);
        let function = |path| router.resolve(path).map(|m| m.function);
        assert_eq!(function("/"), Some("echo"));
        assert_eq!(function("/chat"), Some("chat"));
        assert_eq!(function("/chat/room-1"), Some("chat"));
        assert_eq!(function("/chat/admin/x"), Some("admin"));
        assert_eq!(function("/chatter"), Some("echo"));
        assert_eq!(
            router.resolve("/chat/room-1").map(|m| m.route),
            Some("/chat")
        );
    }

    #[test]
    fn without_a_root_route_unknown_paths_do_not_match() {
        let router = router(&[("/chat", "chat")]);
        assert_eq!(router.resolve("/other"), None);
        assert_eq!(router.resolve("/chatter"), None);
        assert!(router.resolve("/chat").is_some());
    }

    #[test]
    fn a_path_without_a_leading_slash_matches_nothing() {
        let router = router(&[("/", "echo")]);
        assert!(router.resolve("chat").is_none());
        assert!(router.resolve("").is_none());
        assert_eq!(router.resolve("/x").map(|m| m.route), Some("/"));
    }
}
