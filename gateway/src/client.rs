//! The management API client behind `tidegate fn`, `route`, `conn` and
//! `group`: one request to the admin listener's `/v1/` per command, and
//! what is printed of its answer (a summary for people, or the JSON as it
//! came with `--json`).
//!
//! Summaries read the fields the API documents and show `-` for one that
//! is missing, so a field the API adds later never breaks them; `--json`
//! shows everything.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde_json::Value;

use crate::router::RouteSpec;

/// Where the admin listener answers unless `--url` or
/// `TIDEGATE_ADMIN_URL` says otherwise (`admin.listen`'s default).
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9090";

/// Exit status for a command line the gateway was never asked about (a
/// bad function name, nothing to send): sysexits' EX_USAGE.
pub const EXIT_USAGE: u8 = 64;

/// Exit status when the admin listener cannot be reached: sysexits'
/// EX_UNAVAILABLE, so a script can tell "not up yet" from "refused".
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Content type of a text message.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Content type of a binary message.
pub const BINARY: &str = "application/octet-stream";

/// Content type of an uploaded component.
const WASM: &str = "application/wasm";

/// Longest wait for the TCP connection: a gateway that is up accepts at
/// once, so this only bounds a silent network.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for a whole request and its answer: an upload of a
/// large (JS or Python) component is validated and compiled before the
/// gateway answers, which takes seconds to tens of seconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest answer read; the API's answers are small JSON documents.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// The management API's bearer token (`admin.token`). Never shown: not
/// by `Debug`, not in errors.
#[derive(Clone)]
pub struct AdminToken(String);

impl From<String> for AdminToken {
    fn from(token: String) -> Self {
        Self(token)
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Why a management command failed; [`ClientError::exit_code`] picks the
/// exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The command line asks for something that cannot be sent; nothing
    /// was sent.
    #[error("{0}")]
    Usage(String),
    /// A file named on the command line could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No connection to the admin listener.
    #[error(
        "cannot reach the admin API at {url} ({reason}); is the gateway running? \
         Point --url or TIDEGATE_ADMIN_URL at its admin listener"
    )]
    Unreachable {
        /// The base URL, without any password in it.
        url: String,
        /// The innermost cause, such as "Connection refused".
        reason: String,
    },
    /// The API answered with an error status; `kind` and `message` are
    /// its words (its JSON error, or the status' name and the body's
    /// text when the body is not one).
    #[error("{status} {kind}: {message}{hint}", status = .status.as_u16())]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error's kind, such as `conflict`.
        kind: String,
        /// What the API said.
        message: String,
        /// A hint of ours, after the API's words (empty for none).
        hint: &'static str,
    },
    /// The request failed after connecting, or the answer was not one
    /// the API gives.
    #[error("{0}")]
    Http(String),
    /// The answer could not be written out.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl ClientError {
    /// The process's exit status for this error: [`EXIT_USAGE`] for a
    /// command line that was never sent, [`EXIT_UNAVAILABLE`] when the
    /// gateway cannot be reached, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Unreachable { .. } => EXIT_UNAVAILABLE,
            _ => 1,
        }
    }
}

/// Check a function name against the API's rule (the router's, the same
/// for config-file names) before anything is sent.
///
/// # Errors
/// [`ClientError::Usage`] naming the rule.
pub fn check_function_name(name: &str) -> Result<(), ClientError> {
    if crate::router::is_function_name(name) {
        Ok(())
    } else {
        Err(ClientError::Usage(format!(
            "{name:?} is not a function name: lowercase letters, digits and '-', \
             starting with a letter or digit, at most 63 characters"
        )))
    }
}

/// A message for a connection or a group.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The message, exactly as it is delivered.
    pub bytes: Vec<u8>,
    /// Delivered as a text message (else as a binary one).
    pub text: bool,
}

impl Payload {
    fn content_type(&self) -> &'static str {
        if self.text { TEXT } else { BINARY }
    }
}

/// A client of one admin listener's management API.
#[derive(Debug)]
pub struct AdminClient {
    http: reqwest::Client,
    /// The admin listener, as `--url` gave it.
    base: Url,
    /// Sent as `Authorization: Bearer`; `None` sends no header.
    token: Option<AdminToken>,
}

/// The warning for a token about to go in clear text beyond this host:
/// `http://` to an address that is not loopback.
fn cleartext_warning(base: &Url, has_token: bool) -> Option<String> {
    if !has_token || base.scheme() != "http" {
        return None;
    }
    let host = base.host_str()?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!(
            "the admin token goes in clear text to {base} (http://): anyone on the path can \
             read it; reach the admin listener over a private network or a TLS proxy (https://)"
        )
    })
}

impl AdminClient {
    /// A client of the admin listener at `url` (`http://` or `https://`),
    /// sending `token` with every request; an empty token is none.
    ///
    /// # Errors
    /// [`ClientError::Usage`] for a URL that is not an `http(s)://` URL.
    pub fn new(url: &str, token: Option<AdminToken>) -> Result<Self, ClientError> {
        let base = Url::parse(url)
            .ok()
            .filter(|base| matches!(base.scheme(), "http" | "https") && base.has_host())
            .ok_or_else(|| {
                ClientError::Usage(format!(
                    "--url {url:?} is not an http:// or https:// URL (such as {DEFAULT_ADMIN_URL})"
                ))
            })?;
        // reqwest takes rustls' process-wide provider (ring, the one the
        // binary uses) and panics without one; installing is idempotent.
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("tidegate/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Http(format!("cannot set up the HTTP client: {e}")))?;
        let token = token.filter(|token| !token.0.is_empty());
        if let Some(warning) = cleartext_warning(&base, token.is_some()) {
            eprintln!("tidegate: warning: {warning}");
        }
        Ok(Self { http, base, token })
    }

    /// `PUT /v1/functions/{name}`: upload a component; live at once
    /// unless `live` is false.
    pub async fn deploy(
        &self,
        name: &str,
        component: Vec<u8>,
        live: bool,
    ) -> Result<Answer, ClientError> {
        let mut url = self.url(&["functions", name])?;
        if !live {
            url.query_pairs_mut().append_pair("live", "false");
        }
        self.send(Method::PUT, url, Some((component, WASM))).await
    }

    /// `GET /v1/functions`.
    pub async fn functions(&self) -> Result<Answer, ClientError> {
        self.get(&["functions"]).await
    }

    /// `GET /v1/functions/{name}`.
    pub async fn function(&self, name: &str) -> Result<Answer, ClientError> {
        self.get(&["functions", name]).await
    }

    /// `PUT /v1/functions/{name}/live`: make `version` the live one.
    pub async fn set_live(&self, name: &str, version: &str) -> Result<Answer, ClientError> {
        let body = serde_json::json!({ "version": version });
        self.send_json(Method::PUT, self.url(&["functions", name, "live"])?, &body)
            .await
    }

    /// `DELETE /v1/functions/{name}`, or only one of its versions.
    pub async fn remove_function(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let url = match version {
            Some(version) => self.url(&["functions", name, "versions", version])?,
            None => self.url(&["functions", name])?,
        };
        self.send(Method::DELETE, url, None).await
    }

    /// `PUT /v1/routes`.
    pub async fn set_route(&self, route: &RouteSpec) -> Result<Answer, ClientError> {
        self.send_json(Method::PUT, self.url(&["routes"])?, route)
            .await
    }

    /// `GET /v1/routes`.
    pub async fn routes(&self) -> Result<Answer, ClientError> {
        self.get(&["routes"]).await
    }

    /// `DELETE /v1/routes?path=`.
    pub async fn remove_route(&self, path: &str) -> Result<Answer, ClientError> {
        let mut url = self.url(&["routes"])?;
        url.query_pairs_mut().append_pair("path", path);
        self.send(Method::DELETE, url, None).await
    }

    /// `POST /v1/connections/{id}`: send a message to one connection.
    pub async fn send_to_connection(
        &self,
        id: &str,
        payload: Payload,
    ) -> Result<Answer, ClientError> {
        self.post(&["connections", id], payload).await
    }

    /// `GET /v1/connections/{id}`.
    pub async fn connection(&self, id: &str) -> Result<Answer, ClientError> {
        self.get(&["connections", id]).await
    }

    /// `DELETE /v1/connections/{id}?code=&reason=`: close a connection.
    pub async fn close_connection(
        &self,
        id: &str,
        code: Option<u16>,
        reason: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let mut url = self.url(&["connections", id])?;
        add_query(&mut url, "code", code.map(|code| code.to_string()));
        add_query(&mut url, "reason", reason);
        self.send(Method::DELETE, url, None).await
    }

    /// `GET /v1/connections?route=&group=&limit=`.
    pub async fn connections(
        &self,
        route: Option<&str>,
        group: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Answer, ClientError> {
        let mut url = self.url(&["connections"])?;
        add_query(&mut url, "route", route);
        add_query(&mut url, "group", group);
        add_query(&mut url, "limit", limit.map(|limit| limit.to_string()));
        self.send(Method::GET, url, None).await
    }

    /// `POST /v1/groups/{group}/messages`: send a message to every member.
    pub async fn send_to_group(
        &self,
        group: &str,
        payload: Payload,
    ) -> Result<Answer, ClientError> {
        self.post(&["groups", group, "messages"], payload).await
    }

    /// `GET /v1/groups/{group}`.
    pub async fn group(&self, group: &str) -> Result<Answer, ClientError> {
        self.get(&["groups", group]).await
    }

    /// The base URL plus `/v1/` and `segments`, each percent-encoded as a
    /// whole (a `/` in a connection id stays inside its segment).
    ///
    /// # Errors
    /// [`ClientError::Usage`] for an empty, `.` or `..` segment, which a
    /// URL cannot carry as one (it would name another endpoint).
    fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
            return Err(ClientError::Usage(format!(
                "{bad:?} cannot be a name or id in a URL path"
            )));
        }
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v1").extend(segments);
        }
        Ok(url)
    }

    /// `GET` the URL of `segments`.
    async fn get(&self, segments: &[&str]) -> Result<Answer, ClientError> {
        self.send(Method::GET, self.url(segments)?, None).await
    }

    /// `POST` a message to the URL of `segments`.
    async fn post(&self, segments: &[&str], payload: Payload) -> Result<Answer, ClientError> {
        let content_type = payload.content_type();
        let url = self.url(segments)?;
        self.send(Method::POST, url, Some((payload.bytes, content_type)))
            .await
    }

    async fn send_json(
        &self,
        method: Method,
        url: Url,
        body: &impl Serialize,
    ) -> Result<Answer, ClientError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| ClientError::Http(format!("cannot encode the request: {e}")))?;
        self.send(method, url, Some((body, "application/json")))
            .await
    }

    /// Send one request; a 2xx answer is returned, any other is an error.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<Answer, ClientError> {
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.token {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", token.0)).map_err(|_| {
                    ClientError::Usage(
                        "the admin token holds characters an HTTP header cannot carry".to_owned(),
                    )
                })?;
            // Kept out of reqwest's and hyper's debug output.
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let sending = body.as_ref().map(|(bytes, _)| bytes.len());
        if let Some((bytes, content_type)) = body {
            request = request.header(CONTENT_TYPE, content_type).body(bytes);
        }
        let mut response = request.send().await.map_err(|e| match sending {
            Some(size) if cut_off(&e) => ClientError::Http(format!(
                "the admin API at {} closed the connection before the request's {size} bytes \
                 were sent ({}): most likely it refused the request unread (a component larger \
                 than the gateway's admin.max_upload_size, or a wrong token), or it restarted; \
                 its log says which",
                self.shown_url(),
                innermost(&e)
            )),
            _ => self.failed(&e),
        })?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.failed(&e))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ClientError::Http(format!(
                    "the answer from {} is larger than {} MiB",
                    self.shown_url(),
                    MAX_ANSWER_BYTES >> 20
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let answer = Answer::new(status, body);
        if status.is_success() {
            Ok(answer)
        } else {
            Err(answer.into_error(self.token.is_some()))
        }
    }

    /// The error for a request that got no answer.
    fn failed(&self, e: &reqwest::Error) -> ClientError {
        let reason = innermost(e);
        if e.is_connect() {
            ClientError::Unreachable {
                url: self.shown_url(),
                reason,
            }
        } else if e.is_timeout() {
            ClientError::Http(format!(
                "the admin API at {} did not answer in time ({reason})",
                self.shown_url()
            ))
        } else {
            ClientError::Http(format!(
                "request to the admin API at {} failed: {reason}",
                self.shown_url()
            ))
        }
    }

    /// The base URL for messages, without a password in it.
    fn shown_url(&self) -> String {
        let mut url = self.base.clone();
        let _ = url.set_password(None);
        url.to_string()
    }
}

/// Append `key=value` to `url`'s query when there is a value.
fn add_query(url: &mut Url, key: &str, value: Option<impl AsRef<str>>) {
    if let Some(value) = value {
        url.query_pairs_mut().append_pair(key, value.as_ref());
    }
}

/// Whether `e` is the connection closing (or reset) under a request still
/// being written.
fn cut_off(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(error) = next {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// The last error in `e`'s chain: the one that says what happened
/// ("Connection refused (os error 111)") rather than where.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(source) = last.source() {
        last = source;
    }
    last.to_string()
}

/// A 2xx answer of the API.
#[derive(Debug)]
pub struct Answer {
    /// Its status (a deploy tells a new version, 201, from a known one).
    pub status: StatusCode,
    /// The body as it came.
    pub body: Vec<u8>,
    /// The body as JSON; `Null` when it is empty or not JSON.
    pub json: Value,
}

impl Answer {
    fn new(status: StatusCode, body: Vec<u8>) -> Self {
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Self { status, body, json }
    }

    /// What to print: the body as it came when `json`, else `summary`'s
    /// words for it; either ends with a newline unless empty.
    pub fn render(&self, json: bool, summary: impl FnOnce(&Self) -> String) -> String {
        let mut text = if json {
            String::from_utf8_lossy(&self.body).into_owned()
        } else {
            summary(self)
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text
    }

    /// The error for a non-2xx answer, in the API's own words.
    fn into_error(self, sent_token: bool) -> ClientError {
        let reason = self
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_lowercase();
        let (kind, message) = match &self.json {
            Value::Object(error) => (
                error.get("error").and_then(Value::as_str),
                error.get("message").and_then(Value::as_str),
            ),
            _ => (None, None),
        };
        let message = match message {
            Some(message) => message.to_owned(),
            None => String::from_utf8_lossy(&self.body).trim().to_owned(),
        };
        let hint = match self.status {
            StatusCode::UNAUTHORIZED if !sent_token => {
                " (no token was sent: set --token or TIDEGATE_ADMIN_TOKEN to the gateway's admin.token)"
            }
            _ => "",
        };
        ClientError::Api {
            status: self.status,
            kind: kind.unwrap_or(&reason).to_owned(),
            message,
            hint,
        }
    }
}

// What people read. Each takes the answer's JSON as the API documents it.

/// `deployed chat version 3f2a... (live)`, or `unchanged: ...` when that
/// exact component was a version already; `asked_live` stands in when
/// the answer does not say whether the version is live.
pub fn deployed(answer: &Answer, name: &str, asked_live: bool) -> String {
    let json = &answer.json;
    let version = cell(json.get("version"));
    let name = json.get("name").and_then(Value::as_str).unwrap_or(name);
    let live = json
        .get("live")
        .and_then(Value::as_bool)
        .unwrap_or(asked_live);
    let mut about = vec![if live { "live" } else { "not live" }.to_owned()];
    about.extend(json.get("size").and_then(Value::as_u64).map(bytes));
    let about = about.join(", ");
    if answer.status == StatusCode::CREATED {
        let pruned: Vec<&str> = json
            .get("pruned")
            .and_then(Value::as_array)
            .map(|pruned| pruned.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut text = format!("deployed {name} version {version} ({about})");
        if !pruned.is_empty() {
            text.push_str(&format!(
                "; oldest versions deleted (admin.max_versions): {}",
                pruned.join(", ")
            ));
        }
        text
    } else {
        format!("unchanged: {name} version {version} is this component already ({about})")
    }
}

/// `chat: version 3f2a is live`, the version as the API answered.
pub fn live_version(json: &Value, name: &str, asked: &str) -> String {
    let version = json.get("live").and_then(Value::as_str).unwrap_or(asked);
    format!("{name}: version {version} is live")
}

/// `NAME VERSION VERSIONS INSTANCES LOADED ORIGIN`, a row per function;
/// VERSION is the live one.
pub fn function_table(json: &Value) -> String {
    let Some(functions) = items(json, "functions") else {
        return fields(json, &[]);
    };
    if functions.is_empty() {
        return "no functions".to_owned();
    }
    let rows = functions
        .iter()
        .map(|function| {
            vec![
                cell(function.get("name")),
                live_of(function),
                count(function.get("versions")),
                cell(function.get("instances")),
                cell(function.get("loaded")),
                cell(function.get("origin")),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "VERSION",
            "VERSIONS",
            "INSTANCES",
            "LOADED",
            "ORIGIN",
        ],
        rows,
    )
}

/// A function's name and live version, then a row per version.
pub fn function_versions(json: &Value) -> String {
    let Some(versions) = items(json, "versions") else {
        return fields(json, &[]);
    };
    let rows = versions
        .iter()
        .map(|version| {
            let live = version.get("live").and_then(Value::as_bool) == Some(true);
            vec![
                cell(version.get("version")),
                if live { "*" } else { "" }.to_owned(),
                version
                    .get("size")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "-".to_owned(), bytes),
                cell(version.get("created")),
                cell(version.get("instances")),
                cell(version.get("invocations")),
                cell(version.get("digest")),
            ]
        })
        .collect();
    let heading = match json.get("name").and_then(Value::as_str) {
        Some(name) => {
            let origin = match json.get("origin").and_then(Value::as_str) {
                Some(origin) => format!(" ({origin})"),
                None => String::new(),
            };
            format!("function {name}{origin}, live version {}\n", live_of(json))
        }
        None => String::new(),
    };
    heading
        + &table(
            &[
                "VERSION",
                "LIVE",
                "SIZE",
                "CREATED",
                "INSTANCES",
                "INVOCATIONS",
                "DIGEST",
            ],
            rows,
        )
}

/// `PATH ORIGIN FUNCTIONS`, a row per route.
pub fn route_table(json: &Value) -> String {
    let Some(routes) = items(json, "routes") else {
        return fields(json, &[]);
    };
    if routes.is_empty() {
        return "no routes".to_owned();
    }
    let rows = routes
        .iter()
        .map(|route| {
            vec![
                cell(route.get("path")),
                cell(route.get("origin")),
                route_targets(route),
            ]
        })
        .collect();
    table(&["PATH", "ORIGIN", "FUNCTIONS"], rows)
}

/// Which functions a route runs: `chat`, or
/// `connect=auth default=chat selection=... join=chat-join`.
pub fn route_targets(route: &Value) -> String {
    if let Some(function) = route.get("function").and_then(Value::as_str) {
        return function.to_owned();
    }
    let mut parts: Vec<String> = ["connect", "disconnect", "default", "selection"]
        .iter()
        .filter_map(|key| {
            let value = route.get(*key)?.as_str()?;
            Some(format!("{key}={value}"))
        })
        .collect();
    if let Some(Value::Object(routes)) = route.get("routes") {
        parts.extend(
            routes
                .iter()
                .map(|(key, function)| format!("{key}={}", cell(Some(function)))),
        );
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" ")
    }
}

/// A connection's fields, one a line, in the API's order.
pub fn connection_fields(json: &Value) -> String {
    fields(
        json,
        &[
            "id",
            "route",
            "path",
            "remote_addr",
            "connected_at",
            "last_active_at",
            "groups",
            "node",
        ],
    )
}

/// `ID ROUTE PATH REMOTE CONNECTED`, a row per connection.
pub fn connection_table(json: &Value) -> String {
    let Some(connections) = items(json, "connections") else {
        return fields(json, &[]);
    };
    if connections.is_empty() {
        return "no connections".to_owned();
    }
    let rows = connections
        .iter()
        .map(|connection| match connection {
            // A bare id.
            Value::String(id) => vec![id.clone(), "-".into(), "-".into(), "-".into(), "-".into()],
            _ => vec![
                cell(connection.get("id")),
                cell(connection.get("route")),
                cell(connection.get("path")),
                cell(connection.get("remote_addr")),
                cell(connection.get("connected_at")),
            ],
        })
        .collect();
    table(&["ID", "ROUTE", "PATH", "REMOTE", "CONNECTED"], rows)
}

/// A group's name and member count.
pub fn group_summary(json: &Value, group: &str) -> String {
    match json.get("members").and_then(Value::as_u64) {
        Some(members) => format!("group {group}: {members} member{}", plural(members)),
        None => fields(json, &[]),
    }
}

/// `sent 5 B (text) to c1`; for a group, how many members it reached
/// and how many it skipped for a full send queue, when the API says.
pub fn sent(json: &Value, payload_len: usize, text: bool, to: &str) -> String {
    let kind = if text { "text" } else { "binary" };
    let mut line = format!("sent {} ({kind}) to {to}", bytes(payload_len as u64));
    if let Some(delivered) = json.get("delivered").and_then(Value::as_u64) {
        line += &format!(": delivered to {delivered} connection{}", plural(delivered));
    }
    match json.get("full").and_then(Value::as_u64) {
        Some(full) if full > 0 => line += &format!(", {full} skipped (send queue full)"),
        _ => {}
    }
    line
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The list in `json`: `json` itself, or its field `key`.
fn items<'a>(json: &'a Value, key: &str) -> Option<&'a Vec<Value>> {
    json.as_array()
        .or_else(|| json.get(key).and_then(Value::as_array))
}

/// An object's fields as aligned `key: value` lines, those in `first`
/// first, the rest in name order; anything else as JSON.
fn fields(json: &Value, first: &[&str]) -> String {
    let Value::Object(map) = json else {
        return match json {
            Value::Null => String::new(),
            other => other.to_string(),
        };
    };
    let mut keys: Vec<&str> = first
        .iter()
        .copied()
        .filter(|key| map.contains_key(*key))
        .collect();
    keys.extend(
        map.keys()
            .map(String::as_str)
            .filter(|key| !first.contains(key)),
    );
    let width = keys.iter().map(|key| key.len()).max().unwrap_or(0) + 1;
    keys.iter()
        .map(|key| format!("{:width$} {}", format!("{key}:"), cell(map.get(*key))))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One value as a table cell: strings bare, `yes`/`no`, lists joined,
/// `-` for none.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Bool(true)) => "yes".to_owned(),
        Some(Value::Bool(false)) => "no".to_owned(),
        Some(Value::Array(list)) if list.is_empty() => "-".to_owned(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|item| cell(Some(item)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
    }
}

/// The live version: `live` as the API names it (`version` in older
/// answers), `-` for none.
fn live_of(function: &Value) -> String {
    match function.get("live") {
        Some(Value::String(version)) => version.clone(),
        Some(Value::Null) => "-".to_owned(),
        _ => cell(function.get("version")),
    }
}

/// A count given as a number or as the list itself.
fn count(value: Option<&Value>) -> String {
    match value {
        Some(Value::Array(list)) => list.len().to_string(),
        other => cell(other),
    }
}

/// `512 B`, `1.5 KiB`, `12.3 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Columns aligned to their widest cell, two spaces apart.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let pad = width - cell.chars().count() + 2;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        line
    };
    let mut lines = vec![line(headers.iter().map(|h| (*h).to_owned()).collect())];
    lines.extend(rows.into_iter().map(line));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::http::{HeaderMap, Uri};
    use clap::Parser;
    use tokio::net::TcpListener;

    use super::*;
    use crate::cli::{Cli, Command};

    /// What the imitation API saw of a request.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        /// Path and query, as sent (still percent-encoded).
        uri: String,
        authorization: Option<String>,
        content_type: Option<String>,
        body: Vec<u8>,
    }

    /// An imitation of the admin API on a free port that answers every
    /// request with `status` and `body` and records what it was asked.
    async fn imitation(status: u16, body: &'static str) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, request: Bytes| {
                let record = record.clone();
                async move {
                    let header = |name| {
                        headers
                            .get(name)
                            .map(|value: &HeaderValue| value.to_str().unwrap().to_owned())
                    };
                    record.lock().unwrap().push(Seen {
                        method,
                        uri: uri.to_string(),
                        authorization: header(AUTHORIZATION),
                        content_type: header(CONTENT_TYPE),
                        body: request.to_vec(),
                    });
                    let kind = if body.starts_with('{') {
                        "application/json"
                    } else {
                        "text/plain"
                    };
                    (
                        StatusCode::from_u16(status).unwrap(),
                        [(CONTENT_TYPE, kind)],
                        body,
                    )
                }
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    /// Run `tidegate ARGS --url URL` in-process; what it printed, or its
    /// error.
    async fn tidegate(url: &str, args: &[&str]) -> Result<String, ClientError> {
        let mut argv = vec!["tidegate"];
        argv.extend(args);
        argv.extend(["--url", url]);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Manage(command) = cli.command else {
            panic!("not a management command: {args:?}");
        };
        let mut out = Vec::new();
        crate::cli::manage(command, &mut out).await?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// Answer `args` with `status` and `body`; what was printed and the
    /// one request the API saw.
    async fn exchange(
        args: &[&str],
        status: u16,
        body: &'static str,
    ) -> (Result<String, ClientError>, Seen) {
        let (url, seen) = imitation(status, body).await;
        let printed = tidegate(&url, args).await;
        let mut seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "one request for {args:?}");
        (printed, seen.remove(0))
    }

    fn component(name: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, b"\0asm component").unwrap();
        (dir, path.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn deploy_puts_the_component_under_the_file_stem_with_the_token() {
        let (_dir, file) = component("chat.wasm");
        let (printed, seen) = exchange(
            &["fn", "deploy", &file, "--token", "s3cret"],
            201,
            r#"{"name":"chat","version":"3f2a","digest":"3f2a99","size":2048,"created":"now","live":true}"#,
        )
        .await;
        assert_eq!(
            printed.unwrap(),
            "deployed chat version 3f2a (live, 2.0 KiB)\n"
        );
        assert_eq!(seen.method, Method::PUT);
        assert_eq!(seen.uri, "/v1/functions/chat");
        assert_eq!(seen.authorization.as_deref(), Some("Bearer s3cret"));
        assert_eq!(seen.content_type.as_deref(), Some("application/wasm"));
        assert_eq!(seen.body, b"\0asm component");
    }

    #[tokio::test]
    async fn deploy_says_which_old_versions_were_deleted() {
        let (_dir, file) = component("chat.wasm");
        let (printed, _) = exchange(
            &["fn", "deploy", &file],
            201,
            r#"{"name":"chat","version":"3f2a","size":2048,"live":true,"pruned":["0a1b","2c3d"]}"#,
        )
        .await;
        assert_eq!(
            printed.unwrap(),
            "deployed chat version 3f2a (live, 2.0 KiB); oldest versions deleted \
             (admin.max_versions): 0a1b, 2c3d\n"
        );
    }

    #[tokio::test]
    async fn deploy_with_a_name_and_no_live_says_unchanged_for_a_known_digest() {
        let (_dir, file) = component("chat_room.wasm");
        let (printed, seen) = exchange(
            &["fn", "deploy", &file, "--name", "room", "--no-live"],
            200,
            r#"{"name":"room","version":"3f2a","digest":"3f2a99","size":14,"created":"now"}"#,
        )
        .await;
        assert_eq!(
            printed.unwrap(),
            "unchanged: room version 3f2a is this component already (not live, 14 B)\n"
        );
        assert_eq!(seen.uri, "/v1/functions/room?live=false");
        assert_eq!(seen.authorization, None);
    }

    #[tokio::test]
    async fn deploy_refuses_a_bad_name_before_sending_anything() {
        let (url, seen) = imitation(201, "{}").await;
        let (_dir, file) = component("chat_room.wasm");
        let too_long = "a".repeat(64);
        for args in [
            vec!["fn", "deploy", file.as_str()],
            vec!["fn", "deploy", file.as_str(), "--name=-chat"],
            vec!["fn", "deploy", file.as_str(), "--name", "Chat"],
            vec!["fn", "deploy", file.as_str(), "--name", &too_long],
        ] {
            let error = tidegate(&url, &args).await.unwrap_err();
            assert_eq!(error.exit_code(), EXIT_USAGE, "{args:?}: {error}");
            assert!(error.to_string().contains("not a function name"), "{error}");
        }
        assert!(seen.lock().unwrap().is_empty());
        assert!(check_function_name(&"a".repeat(63)).is_ok());
        assert!(check_function_name("0-chat-2").is_ok());
    }

    #[tokio::test]
    async fn deploy_of_a_missing_file_fails_before_sending() {
        let (url, seen) = imitation(201, "{}").await;
        let error = tidegate(&url, &["fn", "deploy", "/nonexistent/chat.wasm"])
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot read /nonexistent/chat.wasm")
        );
        assert_eq!(error.exit_code(), 1);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn fn_list_prints_a_table() {
        let (printed, seen) = exchange(
            &["fn", "list"],
            200,
            r#"{"functions":[
                {"name":"chat","origin":"api","live":"3f2a","versions":2,"instances":1,"loaded":true},
                {"name":"echo","origin":"config","live":"9b1c","versions":1,"instances":0,"loaded":false},
                {"name":"idle","origin":"api","live":null,"versions":1,"instances":0,"loaded":false}]}"#,
        )
        .await;
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::GET, "/v1/functions")
        );
        assert_eq!(
            printed.unwrap(),
            "NAME  VERSION  VERSIONS  INSTANCES  LOADED  ORIGIN\n\
             chat  3f2a     2         1          yes     api\n\
             echo  9b1c     1         0          no      config\n\
             idle  -        1         0          no      api\n"
        );
    }

    #[tokio::test]
    async fn json_prints_the_answer_as_it_came() {
        let body = r#"{"functions":[],"extra":{"kept":true}}"#;
        let (printed, _) = exchange(&["fn", "list", "--json"], 200, body).await;
        assert_eq!(printed.unwrap(), format!("{body}\n"));
        let (printed, _) = exchange(&["fn", "list"], 200, r#"{"functions":[]}"#).await;
        assert_eq!(printed.unwrap(), "no functions\n");
    }

    #[tokio::test]
    async fn fn_show_lists_versions_with_the_live_one_marked() {
        let (printed, seen) = exchange(
            &["fn", "show", "chat"],
            200,
            r#"{"name":"chat","origin":"api","live":"3f2a","versions":[
                {"version":"3f2a","digest":"3f2a99","size":1536,"created":"t1","live":true,"instances":1,"invocations":7},
                {"version":"9b1c","digest":"9b1c00","size":100,"created":"t0","live":false,"instances":0,"invocations":3}]}"#,
        )
        .await;
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::GET, "/v1/functions/chat")
        );
        assert_eq!(
            printed.unwrap(),
            "function chat (api), live version 3f2a\n\
             VERSION  LIVE  SIZE     CREATED  INSTANCES  INVOCATIONS  DIGEST\n\
             3f2a     *     1.5 KiB  t1       1          7            3f2a99\n\
             9b1c           100 B    t0       0          3            9b1c00\n"
        );
    }

    #[tokio::test]
    async fn fn_rollback_puts_the_version_live() {
        let (printed, seen) = exchange(
            &["fn", "rollback", "chat", "9b1c"],
            200,
            r#"{"name":"chat","live":"9b1c"}"#,
        )
        .await;
        assert_eq!(printed.unwrap(), "chat: version 9b1c is live\n");
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::PUT, "/v1/functions/chat/live")
        );
        assert_eq!(seen.content_type.as_deref(), Some("application/json"));
        assert_eq!(seen.body, br#"{"version":"9b1c"}"#);
    }

    #[tokio::test]
    async fn fn_rm_deletes_the_function_or_one_version() {
        let (printed, seen) = exchange(&["fn", "rm", "chat"], 204, "").await;
        assert_eq!(printed.unwrap(), "removed function chat\n");
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::DELETE, "/v1/functions/chat")
        );
        let (printed, seen) = exchange(&["fn", "rm", "chat", "--version", "9b1c"], 204, "").await;
        assert_eq!(printed.unwrap(), "removed chat version 9b1c\n");
        assert_eq!(seen.uri, "/v1/functions/chat/versions/9b1c");
    }

    #[tokio::test]
    async fn route_set_sends_the_short_form() {
        let (printed, seen) = exchange(&["route", "set", "/chat", "chat"], 200, "{}").await;
        assert_eq!(printed.unwrap(), "route /chat -> chat\n");
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::PUT, "/v1/routes")
        );
        assert_eq!(seen.content_type.as_deref(), Some("application/json"));
        let body: Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"path": "/chat", "function": "chat"})
        );
    }

    #[tokio::test]
    async fn route_set_sends_the_long_form() {
        let args = [
            "route",
            "set",
            "/chat",
            "--connect",
            "auth",
            "--default",
            "chat",
            "--selection",
            "$request.body.action",
            "--route",
            "join=chat-join",
            "--route",
            "send=chat-send",
        ];
        let (printed, seen) = exchange(&args, 200, "{}").await;
        assert_eq!(
            printed.unwrap(),
            "route /chat -> connect=auth default=chat selection=$request.body.action \
             join=chat-join send=chat-send\n"
        );
        let body: Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "path": "/chat", "connect": "auth", "default": "chat",
                "selection": "$request.body.action",
                "routes": {"join": "chat-join", "send": "chat-send"},
            })
        );
    }

    #[test]
    fn route_set_needs_one_form_and_whole_route_keys() {
        for args in [
            &["tidegate", "route", "set", "/chat"][..],
            &[
                "tidegate",
                "route",
                "set",
                "/chat",
                "chat",
                "--default",
                "x",
            ],
            &["tidegate", "route", "set", "/chat", "--route", "join=x"],
            &[
                "tidegate",
                "route",
                "set",
                "/chat",
                "--selection",
                "s",
                "--route",
                "join",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[tokio::test]
    async fn route_set_refuses_a_key_given_twice() {
        let (url, seen) = imitation(200, "{}").await;
        let args = [
            "route",
            "set",
            "/chat",
            "--selection",
            "s",
            "--route",
            "a=x",
            "--route",
            "a=y",
        ];
        let error = tidegate(&url, &args).await.unwrap_err();
        assert_eq!(error.exit_code(), EXIT_USAGE);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn route_list_and_rm() {
        let (printed, seen) = exchange(
            &["route", "list"],
            200,
            r#"{"routes":[{"path":"/","function":"echo","origin":"config"},
                {"path":"/chat","connect":"auth","default":"chat","routes":{"join":"chat-join"},
                 "origin":"api"}]}"#,
        )
        .await;
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::GET, "/v1/routes")
        );
        assert_eq!(
            printed.unwrap(),
            "PATH   ORIGIN  FUNCTIONS\n\
             /      config  echo\n\
             /chat  api     connect=auth default=chat join=chat-join\n"
        );
        let (printed, seen) = exchange(&["route", "rm", "/chat room&x"], 204, "").await;
        assert_eq!(printed.unwrap(), "removed route /chat room&x\n");
        assert_eq!(seen.method, Method::DELETE);
        assert_eq!(seen.uri, "/v1/routes?path=%2Fchat+room%26x");
    }

    #[tokio::test]
    async fn conn_send_posts_text_to_the_encoded_id() {
        let (printed, seen) = exchange(
            &["conn", "send", "node-1/a b?", "héllo", "--token", "t"],
            200,
            "",
        )
        .await;
        assert_eq!(printed.unwrap(), "sent 6 B (text) to node-1/a b?\n");
        assert_eq!(seen.method, Method::POST);
        assert_eq!(seen.uri, "/v1/connections/node-1%2Fa%20b%3F");
        assert_eq!(seen.content_type.as_deref(), Some(TEXT));
        assert_eq!(seen.authorization.as_deref(), Some("Bearer t"));
        assert_eq!(seen.body, "héllo".as_bytes());
    }

    #[tokio::test]
    async fn conn_send_binary_and_files_as_octet_stream() {
        let (printed, seen) = exchange(&["conn", "send", "c1", "hi", "--binary"], 200, "").await;
        assert_eq!(printed.unwrap(), "sent 2 B (binary) to c1\n");
        assert_eq!(seen.content_type.as_deref(), Some(BINARY));
        let (_dir, file) = component("frame.bin");
        let (_, seen) = exchange(&["conn", "send", "c1", "--file", &file], 200, "").await;
        assert_eq!(seen.content_type.as_deref(), Some(BINARY));
        assert_eq!(seen.body, b"\0asm component");
        let (_, seen) = exchange(
            &["conn", "send", "c1", "--file", &file, "--as-text"],
            200,
            "",
        )
        .await;
        assert_eq!(seen.content_type.as_deref(), Some(TEXT));
    }

    #[tokio::test]
    async fn conn_info_close_and_list() {
        let (printed, seen) = exchange(
            &["conn", "info", "c1"],
            200,
            r#"{"node":"n1","id":"c1","route":"/chat","path":"/chat?x=1","remote_addr":"127.0.0.1:5000",
                "connected_at":"t0","last_active_at":"t1","groups":["room","all"]}"#,
        )
        .await;
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::GET, "/v1/connections/c1")
        );
        assert_eq!(
            printed.unwrap(),
            "id:             c1\n\
             route:          /chat\n\
             path:           /chat?x=1\n\
             remote_addr:    127.0.0.1:5000\n\
             connected_at:   t0\n\
             last_active_at: t1\n\
             groups:         room, all\n\
             node:           n1\n"
        );
        let (printed, seen) = exchange(
            &[
                "conn", "close", "c1", "--code", "4000", "--reason", "bye now",
            ],
            204,
            "",
        )
        .await;
        assert_eq!(printed.unwrap(), "closed c1\n");
        assert_eq!(seen.method, Method::DELETE);
        assert_eq!(seen.uri, "/v1/connections/c1?code=4000&reason=bye+now");
        let (printed, seen) = exchange(
            &["conn", "list", "--route", "/chat", "--group", "room", "--limit", "5"],
            200,
            r#"{"connections":[{"id":"c1","route":"/chat","path":"/chat","remote_addr":"127.0.0.1:5000","connected_at":"t0"}]}"#,
        )
        .await;
        assert_eq!(seen.uri, "/v1/connections?route=%2Fchat&group=room&limit=5");
        assert_eq!(
            printed.unwrap(),
            "ID  ROUTE  PATH   REMOTE          CONNECTED\n\
             c1  /chat  /chat  127.0.0.1:5000  t0\n"
        );
    }

    #[tokio::test]
    async fn group_send_and_info() {
        let (printed, seen) = exchange(
            &["group", "send", "room", "hello"],
            200,
            r#"{"group":"room","delivered":3,"full":1}"#,
        )
        .await;
        assert_eq!(
            printed.unwrap(),
            "sent 5 B (text) to group room: delivered to 3 connections, \
             1 skipped (send queue full)\n"
        );
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::POST, "/v1/groups/room/messages")
        );
        assert_eq!(seen.content_type.as_deref(), Some(TEXT));
        assert_eq!(seen.body, b"hello");
        let (printed, seen) = exchange(
            &["group", "info", "room"],
            200,
            r#"{"group":"room","members":1}"#,
        )
        .await;
        assert_eq!(
            (seen.method, seen.uri.as_str()),
            (Method::GET, "/v1/groups/room")
        );
        assert_eq!(printed.unwrap(), "group room: 1 member\n");
    }

    #[tokio::test]
    async fn an_api_error_is_shown_as_the_api_said_it() {
        let (printed, _) = exchange(
            &["fn", "rm", "chat", "--token", "t"],
            409,
            r#"{"error":"conflict","message":"route /chat uses chat"}"#,
        )
        .await;
        let error = printed.unwrap_err();
        assert_eq!(error.to_string(), "409 conflict: route /chat uses chat");
        assert_eq!(error.exit_code(), 1);
        let (printed, _) = exchange(
            &["conn", "info", "gone", "--token", "t"],
            410,
            r#"{"error":"gone","message":"no connection gone"}"#,
        )
        .await;
        assert_eq!(
            printed.unwrap_err().to_string(),
            "410 gone: no connection gone"
        );
        let (printed, _) = exchange(&["fn", "list", "--token", "t"], 500, "boom\n").await;
        let error = printed.unwrap_err();
        assert_eq!(error.to_string(), "500 internal server error: boom");
        assert_eq!(error.exit_code(), 1);
    }

    #[tokio::test]
    async fn unauthorized_without_a_token_hints_at_the_token() {
        let body = r#"{"error":"unauthorized","message":"missing or wrong bearer token"}"#;
        let (printed, _) = exchange(&["fn", "list"], 401, body).await;
        let error = printed.unwrap_err().to_string();
        assert!(
            error.starts_with("401 unauthorized: missing or wrong bearer token (no token was sent"),
            "{error}"
        );
        let (printed, _) = exchange(&["fn", "list", "--token", "wrong"], 401, body).await;
        let error = printed.unwrap_err().to_string();
        assert_eq!(error, "401 unauthorized: missing or wrong bearer token");
    }

    #[tokio::test]
    async fn an_unreachable_gateway_names_the_url_and_the_option() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let error = tidegate(&url, &["fn", "list", "--token", "s3cret"])
            .await
            .unwrap_err();
        assert_eq!(error.exit_code(), EXIT_UNAVAILABLE);
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot reach the admin API at {url}/")),
            "{message}"
        );
        assert!(message.contains("--url or TIDEGATE_ADMIN_URL"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
    }

    #[tokio::test]
    async fn a_dot_segment_is_refused_rather_than_sent_to_another_endpoint() {
        let (url, seen) = imitation(200, "{}").await;
        for args in [
            &["conn", "info", ".."][..],
            &["group", "info", "."],
            &["fn", "show", ""],
        ] {
            let error = tidegate(&url, args).await.unwrap_err();
            assert_eq!(error.exit_code(), EXIT_USAGE, "{args:?}");
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn a_bad_url_is_a_usage_error() {
        for url in ["127.0.0.1:9090", "ftp://host/", "not a url"] {
            let error = AdminClient::new(url, None).unwrap_err();
            assert_eq!(error.exit_code(), EXIT_USAGE, "{url}");
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn the_token_is_never_shown() {
        let cli = Cli::try_parse_from(["tidegate", "fn", "list", "--token", "s3cret"]).unwrap();
        assert!(!format!("{cli:?}").contains("s3cret"));
        let client = AdminClient::new(DEFAULT_ADMIN_URL, Some("s3cret".to_owned().into())).unwrap();
        assert!(!format!("{client:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn a_base_path_is_kept() {
        let (url, seen) = imitation(200, r#"{"functions":[]}"#).await;
        tidegate(&format!("{url}/gateway/"), &["fn", "list"])
            .await
            .unwrap();
        assert_eq!(seen.lock().unwrap()[0].uri, "/gateway/v1/functions");
    }

    #[test]
    fn a_token_over_http_beyond_loopback_is_warned_about() {
        let warn = |url: &str, token: bool| cleartext_warning(&Url::parse(url).unwrap(), token);
        assert!(warn("http://10.0.0.5:9090", true).is_some());
        assert!(warn("http://admin.example.com:9090", true).is_some());
        assert!(
            warn("http://10.0.0.5:9090", false).is_none(),
            "no token, nothing to leak"
        );
        for quiet in [
            "http://127.0.0.1:9090",
            "http://127.0.0.9:9090",
            "http://[::1]:9090",
            "http://localhost:9090",
            "https://admin.example.com",
        ] {
            assert!(warn(quiet, true).is_none(), "{quiet}");
        }
    }
}
