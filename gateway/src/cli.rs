//! The command line: `tidegate serve [--config FILE] [--dev]`, and the
//! management commands `fn`, `route`, `conn` and `group`, which talk to a
//! running gateway's admin API through [`crate::client`].

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::app::App;
use crate::client::{self, AdminClient, AdminToken, ClientError, Payload};
use crate::config::Settings;
use crate::router::RouteSpec;

/// Exit status for a configuration error (EX_CONFIG would be 78; linkerd
/// and sysexits' EX_USAGE use 64 for "the input was wrong").
pub const EXIT_CONFIG: u8 = 64;

/// Tidegate: a self-hosted, auto-scaling WebSocket gateway.
#[derive(Debug, Parser)]
#[command(name = "tidegate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket clients.
    Serve {
        /// TOML configuration file; `TIDEGATE__SECTION__KEY` environment
        /// variables override it.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Development mode: a self-signed certificate, an unprivileged
        /// port (127.0.0.1:8443) and the bundled echo function on `/`; the
        /// local RabbitMQ if there is one, else the spool.
        #[arg(long)]
        dev: bool,
    },
    /// Talk to a running gateway's management API.
    #[command(flatten)]
    Manage(Manage),
}

/// Exit statuses of the management commands, shown in their help.
const MANAGE_EXIT_STATUS: &str = "\
Exit status: 0 done; 1 the API refused (its error is shown as it said it) or
the request failed; 2 a command line that does not parse; 64 one that cannot
be sent (such as a bad function name); 69 the admin API cannot be reached.";

/// The help heading of the options every management command takes.
const ADMIN_OPTIONS: &str = "Admin API options";

/// The management commands.
#[derive(Debug, Subcommand)]
pub enum Manage {
    /// Deploy, list, roll back and remove functions.
    #[command(after_help = MANAGE_EXIT_STATUS)]
    Fn {
        /// Where the API is, and how to print its answers.
        #[command(flatten)]
        admin: AdminArgs,
        /// What to do.
        #[command(subcommand)]
        command: FnCommand,
    },
    /// Choose the functions a WebSocket path runs.
    #[command(after_help = MANAGE_EXIT_STATUS)]
    Route {
        /// Where the API is, and how to print its answers.
        #[command(flatten)]
        admin: AdminArgs,
        /// What to do.
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Send to, look at, list and close client connections.
    #[command(after_help = MANAGE_EXIT_STATUS)]
    Conn {
        /// Where the API is, and how to print its answers.
        #[command(flatten)]
        admin: AdminArgs,
        /// What to do.
        #[command(subcommand)]
        command: ConnCommand,
    },
    /// Send to and count groups of connections.
    #[command(after_help = MANAGE_EXIT_STATUS)]
    Group {
        /// Where the API is, and how to print its answers.
        #[command(flatten)]
        admin: AdminArgs,
        /// What to do.
        #[command(subcommand)]
        command: GroupCommand,
    },
}

/// The options every management command takes.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The gateway's admin listener.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "TIDEGATE_ADMIN_URL",
        help_heading = ADMIN_OPTIONS,
        default_value = client::DEFAULT_ADMIN_URL
    )]
    pub url: String,
    /// The gateway's admin.token, sent as a bearer token (prefer the
    /// variable: options show in the process list).
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "TIDEGATE_ADMIN_TOKEN",
        help_heading = ADMIN_OPTIONS,
        hide_env_values = true
    )]
    pub token: Option<AdminToken>,
    /// Print the API's JSON answer as it came.
    #[arg(long, global = true, help_heading = ADMIN_OPTIONS)]
    pub json: bool,
}

/// `tidegate fn ...`
#[derive(Debug, Subcommand)]
pub enum FnCommand {
    /// Upload a component (.wasm) as a new version, live at once.
    Deploy {
        /// The component.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The function's name [default: the file's name without .wasm].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Keep the live version; `fn rollback` makes the new one live.
        #[arg(long)]
        no_live: bool,
    },
    /// List functions: live version, versions, instances, code loaded.
    List,
    /// Show a function's versions.
    Show {
        /// The function.
        name: String,
    },
    /// Make VERSION the live version (back or forward).
    Rollback {
        /// The function.
        name: String,
        /// The version, as `fn show` lists it.
        version: String,
    },
    /// Remove a function, or one version of it.
    Rm {
        /// The function.
        name: String,
        /// Remove only this version (not the live one).
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
    },
}

/// `tidegate route ...`
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Route a path to one function, or to a function per event.
    ///
    /// `route set /chat chat` runs chat for every event of /chat. The long
    /// form names a function per event: --connect, --disconnect, and for
    /// messages --route KEY=FUNCTION by the key --selection reads, with
    /// --default for the rest.
    #[command(
        override_usage = "tidegate route set [OPTIONS] <PATH> <FUNCTION>\n       \
            tidegate route set [OPTIONS] <PATH> [--connect F] [--disconnect F] [--default F] \
            [--selection EXPR --route KEY=F...]"
    )]
    #[command(group(
        ArgGroup::new("target")
            .required(true)
            .multiple(true)
            .args(["function", "connect", "disconnect", "default", "routes"])
    ))]
    Set {
        /// The WebSocket path, such as /chat.
        path: String,
        /// The function for every event of the path.
        #[arg(conflicts_with_all = ["connect", "disconnect", "default", "selection", "routes"])]
        function: Option<String>,
        /// The function that runs on-connect.
        #[arg(long, value_name = "FUNCTION")]
        connect: Option<String>,
        /// The function that runs on-disconnect.
        #[arg(long, value_name = "FUNCTION")]
        disconnect: Option<String>,
        /// The function for messages no --route matches.
        #[arg(long, value_name = "FUNCTION")]
        default: Option<String>,
        /// Where a message's route key is, such as $request.body.action.
        #[arg(long, value_name = "EXPR")]
        selection: Option<String>,
        /// Messages whose route key is KEY go to FUNCTION; repeatable.
        #[arg(
            long = "route",
            value_name = "KEY=FUNCTION",
            value_parser = route_key,
            requires = "selection"
        )]
        routes: Vec<(String, String)>,
    },
    /// List routes.
    List,
    /// Remove the route of a path.
    Rm {
        /// The WebSocket path.
        path: String,
    },
}

/// `tidegate conn ...`
#[derive(Debug, Subcommand)]
pub enum ConnCommand {
    /// Send a message to a connection.
    Send {
        /// The connection's id.
        id: String,
        /// What to send.
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Show a connection: route, address, times, groups, node.
    Info {
        /// The connection's id.
        id: String,
    },
    /// Close a connection.
    Close {
        /// The connection's id.
        id: String,
        /// The close code [gateway's default: 1000].
        #[arg(long, value_name = "CODE", value_parser = clap::value_parser!(u16).range(1000..=4999))]
        code: Option<u16>,
        /// The close reason.
        #[arg(long, value_name = "REASON")]
        reason: Option<String>,
    },
    /// List connections.
    List {
        /// Only connections of this route (path).
        #[arg(long, value_name = "ROUTE")]
        route: Option<String>,
        /// Only members of this group.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// At most this many.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
}

/// `tidegate group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Send a message to every member of a group.
    Send {
        /// The group.
        group: String,
        /// What to send.
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Count a group's members.
    Info {
        /// The group.
        group: String,
    },
}

/// A message given as an argument, a file or standard input.
#[derive(Debug, Args)]
pub struct PayloadArgs {
    /// The message, sent as text (as binary with --binary). Without TEXT
    /// or --file, standard input is sent.
    #[arg(value_name = "TEXT", conflicts_with = "file")]
    pub text: Option<String>,
    /// Send this file (as binary unless --as-text); - is standard input.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Send as a binary message.
    #[arg(long, conflicts_with = "as_text")]
    pub binary: bool,
    /// Send the file or standard input as a text message (UTF-8).
    #[arg(long)]
    pub as_text: bool,
}

impl PayloadArgs {
    /// The message to send: TEXT as text unless --binary; a file or
    /// standard input as binary unless --as-text.
    fn read(self) -> Result<Payload, ClientError> {
        if let Some(text) = self.text {
            return Ok(Payload {
                bytes: text.into_bytes(),
                text: !self.binary,
            });
        }
        let bytes = match self.file {
            Some(path) if path != Path::new("-") => read_file(&path)?,
            file => {
                if file.is_none() && std::io::stdin().is_terminal() {
                    return Err(ClientError::Usage(
                        "nothing to send: give TEXT, --file FILE, or pipe the message \
                         into standard input"
                            .to_owned(),
                    ));
                }
                let mut bytes = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut bytes)
                    .map_err(|source| ClientError::Read {
                        path: PathBuf::from("standard input"),
                        source,
                    })?;
                bytes
            }
        };
        if self.as_text && std::str::from_utf8(&bytes).is_err() {
            return Err(ClientError::Usage(
                "--as-text: the message is not UTF-8 text; send it without --as-text".to_owned(),
            ));
        }
        Ok(Payload {
            bytes,
            text: self.as_text,
        })
    }
}

/// `KEY=FUNCTION` of `route set --route`.
fn route_key(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, function)) if !key.is_empty() && !function.is_empty() => {
            Ok((key.to_owned(), function.to_owned()))
        }
        _ => Err(format!("{arg:?} is not KEY=FUNCTION")),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parse the arguments, load the configuration and run.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::tls::install_crypto_provider();
    match cli.command {
        Command::Serve { config, dev } => {
            let settings = match Settings::load(config.as_deref(), dev) {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("tidegate: configuration error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            crate::logging::init(settings.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("tidegate")
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("tidegate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tidegate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Manage(command) => {
            crate::logging::init(crate::config::LogFormat::Text);
            // One request and its answer: async on a current-thread runtime,
            // since tokio is linked anyway and reqwest's blocking client
            // would start a runtime of its own on a second thread.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("tidegate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(manage(command, &mut std::io::stdout().lock())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tidegate: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

/// Run one management command against the admin API and write what it
/// answered to `out`.
///
/// # Errors
/// A [`ClientError`]: nothing sent, not reached, or the API's error.
pub async fn manage(command: Manage, out: &mut dyn Write) -> Result<(), ClientError> {
    let text = match command {
        Manage::Fn { admin, command } => {
            let client = admin.client()?;
            match command {
                FnCommand::Deploy {
                    file,
                    name,
                    no_live,
                } => {
                    let name = match name {
                        Some(name) => client::check_function_name(&name).map(|()| name)?,
                        None => function_name_of(&file)?,
                    };
                    let component = read_file(&file)?;
                    let answer = client.deploy(&name, component, !no_live).await?;
                    answer.render(admin.json, |a| client::deployed(a, &name, !no_live))
                }
                FnCommand::List => client
                    .functions()
                    .await?
                    .render(admin.json, |a| client::function_table(&a.json)),
                FnCommand::Show { name } => client
                    .function(&name)
                    .await?
                    .render(admin.json, |a| client::function_versions(&a.json)),
                FnCommand::Rollback { name, version } => client
                    .set_live(&name, &version)
                    .await?
                    .render(admin.json, |a| {
                        client::live_version(&a.json, &name, &version)
                    }),
                FnCommand::Rm { name, version } => client
                    .remove_function(&name, version.as_deref())
                    .await?
                    .render(admin.json, |_| match &version {
                        Some(version) => format!("removed {name} version {version}"),
                        None => format!("removed function {name}"),
                    }),
            }
        }
        Manage::Route { admin, command } => {
            let client = admin.client()?;
            match command {
                RouteCommand::Set {
                    path,
                    function,
                    connect,
                    disconnect,
                    default,
                    selection,
                    routes,
                } => {
                    let route = match function {
                        Some(function) => RouteSpec {
                            path,
                            function: Some(function),
                            ..RouteSpec::default()
                        },
                        None => RouteSpec {
                            path,
                            function: None,
                            connect,
                            disconnect,
                            default,
                            selection,
                            routes: route_keys(routes)?,
                        },
                    };
                    let answer = client.set_route(&route).await?;
                    answer.render(admin.json, |_| {
                        let route = serde_json::to_value(&route).unwrap_or_default();
                        format!(
                            "route {} -> {}",
                            route["path"].as_str().unwrap_or_default(),
                            client::route_targets(&route)
                        )
                    })
                }
                RouteCommand::List => client
                    .routes()
                    .await?
                    .render(admin.json, |a| client::route_table(&a.json)),
                RouteCommand::Rm { path } => client
                    .remove_route(&path)
                    .await?
                    .render(admin.json, |_| format!("removed route {path}")),
            }
        }
        Manage::Conn { admin, command } => {
            let client = admin.client()?;
            match command {
                ConnCommand::Send { id, payload } => {
                    let payload = payload.read()?;
                    let (len, text) = (payload.bytes.len(), payload.text);
                    client
                        .send_to_connection(&id, payload)
                        .await?
                        .render(admin.json, |a| client::sent(&a.json, len, text, &id))
                }
                ConnCommand::Info { id } => client
                    .connection(&id)
                    .await?
                    .render(admin.json, |a| client::connection_fields(&a.json)),
                ConnCommand::Close { id, code, reason } => client
                    .close_connection(&id, code, reason.as_deref())
                    .await?
                    .render(admin.json, |_| format!("closed {id}")),
                ConnCommand::List {
                    route,
                    group,
                    limit,
                } => client
                    .connections(route.as_deref(), group.as_deref(), limit)
                    .await?
                    .render(admin.json, |a| client::connection_table(&a.json)),
            }
        }
        Manage::Group { admin, command } => {
            let client = admin.client()?;
            match command {
                GroupCommand::Send { group, payload } => {
                    let payload = payload.read()?;
                    let (len, text) = (payload.bytes.len(), payload.text);
                    let to = format!("group {group}");
                    client
                        .send_to_group(&group, payload)
                        .await?
                        .render(admin.json, |a| client::sent(&a.json, len, text, &to))
                }
                GroupCommand::Info { group } => client
                    .group(&group)
                    .await?
                    .render(admin.json, |a| client::group_summary(&a.json, &group)),
            }
        }
    };
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

impl AdminArgs {
    fn client(&self) -> Result<AdminClient, ClientError> {
        AdminClient::new(&self.url, self.token.clone())
    }
}

/// The default function name: the file's name without its extension.
fn function_name_of(file: &Path) -> Result<String, ClientError> {
    let stem = file.file_stem().and_then(|stem| stem.to_str());
    let name = stem.ok_or_else(|| {
        ClientError::Usage(format!(
            "cannot take a function name from {}: give one with --name",
            file.display()
        ))
    })?;
    client::check_function_name(name).map_err(|e| {
        ClientError::Usage(format!(
            "{e} (taken from {}; give one with --name)",
            file.display()
        ))
    })?;
    Ok(name.to_owned())
}

/// The `--route` pairs as a map; a key given twice is a mistake, not a
/// choice to guess.
fn route_keys(pairs: Vec<(String, String)>) -> Result<BTreeMap<String, String>, ClientError> {
    let mut routes = BTreeMap::new();
    for (key, function) in pairs {
        if routes.insert(key.clone(), function).is_some() {
            return Err(ClientError::Usage(format!(
                "--route {key}=... is given twice"
            )));
        }
    }
    Ok(routes)
}

/// Build the gateway, say where it listens, and run it until SIGTERM or
/// SIGINT.
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    let addresses = app.addresses();
    if let Some(plain) = addresses.plain {
        println!("Tidegate listening on ws://{plain}/ (no TLS: server.plain_listen)");
    }
    println!(
        "Tidegate listening on wss://{}/ (admin http://{}/metrics)",
        addresses.wss, addresses.admin
    );
    app.run(async {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "termination signal");
    })
    .await
}

/// Wait for SIGTERM or SIGINT; returns its name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
