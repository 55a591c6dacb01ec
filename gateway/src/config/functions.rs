//! `[functions]` and `[routes]`: the functions by name, each a component
//! file or a function bundled into the binary ([`BUILTINS`]), and the paths
//! they serve. That every route names a defined function is checked in
//! the parent module, after `--dev` has added its defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::router::{self, Route, RouteSpec};

/// The functions bundled into the binary, by name, with their components:
/// `wasm = "builtin:<name>"` picks one. The one list both validation and
/// loading use.
pub const BUILTINS: &[(&str, &[u8])] = &[("echo", tidegate_functions::ECHO)];

/// The prefix of `functions.<name>.wasm` that names a built-in function.
const BUILTIN_PREFIX: &str = "builtin:";

/// The component of the built-in function `name`, if there is one.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTINS
        .iter()
        .find(|(builtin, _)| *builtin == name)
        .map(|&(_, wasm)| wasm)
}

/// `[functions.<name>]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFunction {
    /// `functions.<name>.wasm`: a component file, or `builtin:<name>`.
    wasm: String,
}

/// Where a function's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionSource {
    /// A `.wasm` component file.
    File(PathBuf),
    /// A function bundled into the binary (`builtin:echo`), one of
    /// [`BUILTINS`].
    Builtin(String),
}

/// The functions by name: names are plain, builtins exist.
pub(super) fn validate_functions(
    raw: BTreeMap<String, RawFunction>,
) -> Result<BTreeMap<String, FunctionSource>, ConfigError> {
    let mut functions = BTreeMap::new();
    for (name, function) in raw {
        if !router::is_function_name(&name) {
            return Err(invalid(
                format!("functions.{name}"),
                "a function name is lower-case letters, digits and '-', starting with a letter \
                 or digit, at most 63 characters",
            ));
        }
        let source = match function.wasm.strip_prefix(BUILTIN_PREFIX) {
            Some(builtin_name) if builtin(builtin_name).is_some() => {
                FunctionSource::Builtin(builtin_name.to_owned())
            }
            Some(builtin_name) => {
                let names: Vec<&str> = BUILTINS.iter().map(|&(name, _)| name).collect();
                return Err(invalid(
                    format!("functions.{name}.wasm"),
                    format!(
                        "no builtin function {builtin_name:?}; builtins are {}",
                        names.join(", ")
                    ),
                ));
            }
            None => FunctionSource::File(PathBuf::from(function.wasm)),
        };
        functions.insert(name, source);
    }
    Ok(functions)
}

/// `[routes]` as written: `"/chat" = "chat"` (one function for every
/// event) or a table with the long form (`connect`, `disconnect`,
/// `default`, `selection`, `routes`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawRoute {
    /// `"/chat" = "chat"`.
    Short(String),
    /// `[routes."/chat"]` with the long form's keys.
    Long(RawLongRoute),
}

/// The long form of a route in the config file (its path is the key).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLongRoute {
    connect: Option<String>,
    disconnect: Option<String>,
    default: Option<String>,
    selection: Option<String>,
    #[serde(default)]
    routes: BTreeMap<String, String>,
}

/// The route at `path`, validated; every function it names must be one of
/// `functions`.
pub(super) fn validate_route(
    path: &str,
    raw: RawRoute,
    functions: &BTreeMap<String, FunctionSource>,
) -> Result<Route, ConfigError> {
    let key = format!("routes.\"{path}\"");
    let spec = match raw {
        RawRoute::Short(function) => RouteSpec {
            path: path.to_owned(),
            function: Some(function),
            ..RouteSpec::default()
        },
        RawRoute::Long(long) => RouteSpec {
            path: path.to_owned(),
            function: None,
            connect: long.connect,
            disconnect: long.disconnect,
            default: long.default,
            selection: long.selection,
            routes: long.routes,
        },
    };
    let route = Route::new(spec).map_err(|e| {
        if e.field == "path" {
            invalid(&key, e.message)
        } else {
            invalid(format!("{key}.{}", e.field), e.message)
        }
    })?;
    for function in route.functions() {
        if !functions.contains_key(function) {
            return Err(invalid(
                key,
                format!("function {function:?} is not defined under [functions]"),
            ));
        }
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::super::tests::MINIMAL;
    use super::*;

    #[test]
    fn every_builtin_can_be_named_and_others_are_refused_with_the_list() {
        for &(name, wasm) in BUILTINS {
            let text = format!("{MINIMAL}\n[functions.f]\nwasm = \"builtin:{name}\"\n");
            let settings = Settings::from_toml(&text, vec![], false).unwrap();
            assert_eq!(
                settings.functions.get("f"),
                Some(&FunctionSource::Builtin(name.into()))
            );
            assert_eq!(builtin(name), Some(wasm));
            assert!(!wasm.is_empty(), "{name}");
        }
        let text = format!("{MINIMAL}\n[functions.f]\nwasm = \"builtin:nope\"\n");
        let error = Settings::from_toml(&text, vec![], false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("functions.f.wasm") && error.contains("echo"),
            "{error}"
        );
        assert_eq!(builtin("nope"), None);
    }
}
