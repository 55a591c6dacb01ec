//! `tidegate-bench`: measure Tidegate against a raw tokio-tungstenite echo
//! in the same run. Each scenario prints one JSON line and a table;
//! `matrix` runs the standard set and writes a report with a chart.

#![forbid(unsafe_code)]

mod baseline;
mod client;
mod figures;
mod matrix;
mod process;
mod report;
mod scenario;
mod soak;
mod soak_plot;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use client::Target;

/// Load generator and baseline servers for Tidegate.
#[derive(Parser)]
#[command(name = "tidegate-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A load sent at a fixed rate, for the latency scenarios.
#[derive(clap::Args)]
struct Paced {
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    #[arg(short = 's', long, default_value_t = 64)]
    size: usize,
    #[arg(short = 'd', long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

impl Paced {
    fn at(self, rate: f64) -> scenario::latency::Options {
        scenario::latency::Options {
            connections: self.connections,
            rate,
            size: self.size,
            duration: self.duration,
            warmup: self.warmup,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Echo throughput, every reply checked byte for byte.
    Echo {
        /// ws:// or wss:// URL (loopback).
        url: String,
        #[arg(short = 'c', long, default_value_t = 64)]
        connections: usize,
        #[arg(short = 's', long, default_value_t = 64)]
        size: usize,
        #[arg(short = 'w', long, default_value_t = 16)]
        window: usize,
        #[arg(short = 'd', long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// The server's pid, to report its CPU time per message.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Latency percentiles at a fixed offered rate.
    Latency {
        url: String,
        /// Messages per second, all connections together.
        #[arg(short = 'r', long)]
        rate: f64,
        #[command(flatten)]
        load: Paced,
    },
    /// Latency of well-behaved clients, calm and while other connections
    /// make the function fail (the route must run the `faulty` test
    /// function).
    Isolation {
        url: String,
        /// Messages per second, all well-behaved connections together.
        #[arg(short = 'r', long, default_value_t = 2000.0)]
        rate: f64,
        #[command(flatten)]
        load: Paced,
        /// Connections that keep triggering faults.
        #[arg(long, default_value_t = 2)]
        offenders: usize,
        /// The `faulty` commands they cycle through.
        #[arg(long, value_delimiter = ',', default_values_t = scenario::isolation::FAULTS.iter().map(|f| f.to_string()))]
        faults: Vec<String>,
    },
    /// New connections per second (TLS + WebSocket handshake).
    Connect {
        url: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(short = 'd', long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Server memory per idle connection.
    Idle {
        url: String,
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        /// The server's pid (its RSS is the figure).
        #[arg(long)]
        pid: u32,
    },
    /// Time to the reply from a function scaled to zero, and warm.
    ColdStart {
        url: String,
        /// The gateway's admin address.
        #[arg(long)]
        admin: SocketAddr,
        #[arg(long, default_value = "echo")]
        function: String,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// The broker's confirmed publish ceiling.
    Publish {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
        #[arg(short = 's', long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1024)]
        in_flight: usize,
        #[arg(short = 'd', long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Publish at this fixed rate and report confirm latency instead.
        #[arg(long)]
        rate: Option<f64>,
        /// Give each message a gateway copy's properties (message id,
        /// timestamp, five headers) instead of a bare content type.
        #[arg(long)]
        copy_properties: bool,
    },
    /// The runtime alone: reload, instantiate and call the echo function.
    Instantiate {
        #[arg(long, default_value_t = 2000)]
        rounds: usize,
    },
    /// Three nodes of one cluster (started here, on the local broker):
    /// same-node against cross-node sends, a broadcast over the three,
    /// registry propagation.
    Cluster {
        /// The tidegate binary (default: next to this one).
        #[arg(long)]
        tidegate: Option<PathBuf>,
        /// Members of the broadcast group, over the three nodes.
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Sends per latency figure.
        #[arg(long, default_value_t = 500)]
        rounds: usize,
        /// Broadcasts to the group.
        #[arg(long, default_value_t = 50)]
        broadcasts: usize,
    },
    /// Three nodes for a long, bounded run: connection churn, steady
    /// messages, a deploy every few minutes, one broker restart (through
    /// rabbitmqctl); checks that memory and open files do not grow, the
    /// spools empty, and no replied message lacks its copy; plots memory,
    /// open files, spool and queue depth. Outside CI.
    Soak {
        /// The tidegate binary (default: next to this one).
        #[arg(long)]
        tidegate: Option<PathBuf>,
        /// How long the load runs.
        #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Client connections at once, over the three nodes.
        #[arg(long, default_value_t = 300)]
        connections: usize,
        /// Messages per second per connection.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Shortest connection lifetime.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        min_lifetime: Duration,
        /// Longest connection lifetime.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        max_lifetime: Duration,
        /// A new version of the function this often.
        #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
        deploy_every: Duration,
        /// How long the broker stays down, at the middle of the run.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        broker_down: Duration,
        /// How often to sample.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        sample_every: Duration,
        /// Where samples.jsonl, soak.png and summary.md go.
        #[arg(long, default_value = "soak-report")]
        out: PathBuf,
    },
    /// Serve a plain tokio-tungstenite echo (the baseline).
    Baseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long)]
        tls: bool,
    },
    /// Run the standard matrix and write a Markdown report and a chart.
    Matrix {
        /// Where to write report.md, chart.png and results.jsonl.
        #[arg(long, default_value = "bench-report")]
        out: PathBuf,
        /// The tidegate binary (default: next to this one).
        #[arg(long)]
        tidegate: Option<PathBuf>,
        /// Short runs and 1,000 idle connections, to check the set-up.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Command::Baseline { listen, tls } = cli.command {
        // The baseline server gets the same multi-threaded runtime as the
        // gateway.
        return tokio::runtime::Runtime::new()?.block_on(baseline::serve(listen, tls));
    }
    // The load generator runs on one thread, so on a two-core machine the
    // server keeps the other core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    let figures = match command {
        Command::Echo {
            url,
            connections,
            size,
            window,
            duration,
            warmup,
            pid,
        } => {
            let options = scenario::echo::Options {
                connections,
                size,
                window,
                duration,
                warmup,
                server_pid: pid,
            };
            scenario::echo::run(&Target::parse(&url)?, &url, &options).await?
        }
        Command::Latency { url, rate, load } => {
            scenario::latency::run(&Target::parse(&url)?, &url, &load.at(rate)).await?
        }
        Command::Isolation {
            url,
            rate,
            load,
            offenders,
            faults,
        } => {
            let options = scenario::isolation::Options {
                latency: load.at(rate),
                offenders,
                faults,
            };
            scenario::isolation::run(&Target::parse(&url)?, &url, &options).await?
        }
        Command::Connect {
            url,
            concurrency,
            duration,
            pid,
        } => {
            let options = scenario::connect::Options {
                concurrency,
                duration,
                server_pid: pid,
            };
            scenario::connect::run(&Target::parse(&url)?, &url, &options).await?
        }
        Command::Idle {
            url,
            connections,
            pid,
        } => {
            let options = scenario::idle::Options {
                connections,
                concurrency: 64,
                server_pid: pid,
                settle: Duration::from_secs(2),
            };
            scenario::idle::run(&Target::parse(&url)?, &url, &options).await?
        }
        Command::ColdStart {
            url,
            admin,
            function,
            rounds,
        } => {
            let options = scenario::cold::Options {
                admin,
                function,
                rounds,
            };
            scenario::cold::run(&Target::parse(&url)?, &url, &options).await?
        }
        Command::Publish {
            url,
            size,
            in_flight,
            duration,
            rate,
            copy_properties,
        } => {
            let options = scenario::publish::Options {
                url,
                size,
                in_flight,
                duration,
                warmup: Duration::from_secs(2),
                copy_properties,
            };
            match rate {
                Some(rate) => scenario::publish::latency(&options, rate).await?,
                None => scenario::publish::run(&options).await?,
            }
        }
        Command::Instantiate { rounds } => scenario::instantiate::run(rounds).await?,
        Command::Matrix {
            out,
            tidegate,
            quick,
        } => {
            return matrix::run(&out, tidegate, quick).await;
        }
        Command::Cluster {
            tidegate,
            members,
            rounds,
            broadcasts,
        } => {
            matrix::cluster(tidegate, members, rounds, broadcasts)
                .await?
                .print();
            return Ok(());
        }
        Command::Soak {
            tidegate,
            duration,
            connections,
            rate,
            min_lifetime,
            max_lifetime,
            deploy_every,
            broker_down,
            sample_every,
            out,
        } => {
            anyhow::ensure!(
                min_lifetime <= max_lifetime && rate > 0.0 && connections > 0,
                "--min-lifetime at most --max-lifetime, --rate and --connections above 0"
            );
            let options = soak::Options {
                duration,
                connections,
                rate,
                lifetime: (min_lifetime, max_lifetime),
                deploy_every,
                broker_down,
                sample_every,
                out,
            };
            return soak::run(tidegate, &options).await;
        }
        Command::Baseline { .. } => unreachable!("handled before the runtime starts"),
    };
    figures.print();
    Ok(())
}
