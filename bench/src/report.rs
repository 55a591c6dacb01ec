//! The matrix's report: `results.jsonl` (every figure), `report.md` (the
//! table, ratios and targets) and `chart.png` (throughput and latency,
//! Tidegate against the baseline).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::figures::Figures;
use crate::scenario;

/// Fonts tried for the chart's text, in order.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Write the three files. A chart that cannot be drawn (no font) is
/// reported, not fatal: the figures are already written.
///
/// # Errors
/// When the report or the figures cannot be written.
pub fn write(out: &Path, results: &[Figures], quick: bool) -> anyhow::Result<()> {
    let mut lines = String::new();
    for figures in results {
        lines.push_str(&serde_json::to_string(figures)?);
        lines.push('\n');
    }
    std::fs::write(out.join("results.jsonl"), lines)?;
    std::fs::write(out.join("report.md"), markdown(results, quick))?;
    if let Err(e) = chart(&out.join("chart.png"), results) {
        eprintln!("the chart was not drawn: {e:#}");
    }
    Ok(())
}

fn find<'a>(results: &'a [Figures], scenario: &str, server: &str) -> Option<&'a Figures> {
    results
        .iter()
        .find(|f| f.scenario == scenario && f.server == server)
}

fn value(results: &[Figures], scenario: &str, server: &str, name: &str) -> Option<f64> {
    find(results, scenario, server)?.get(name)
}

/// One line of the targets table.
struct Check {
    what: &'static str,
    measured: Option<f64>,
    unit: &'static str,
    reference: String,
    ratio: Option<f64>,
    target: &'static str,
    met: Option<bool>,
}

fn checks(results: &[Figures]) -> Vec<Check> {
    let ceiling = value(
        results,
        "publish",
        scenario::publish::BARE_SERVER,
        "msgs_per_s",
    );
    let copy_ceiling = value(
        results,
        "publish",
        scenario::publish::COPY_SERVER,
        "msgs_per_s",
    );
    let receipt = value(results, "echo", "tidegate (receipt)", "msgs_per_s");
    let off = value(results, "echo", "tidegate (copies off)", "msgs_per_s");
    let wss = value(results, "echo", "baseline wss", "msgs_per_s");
    let off_cpu = value(
        results,
        "echo",
        "tidegate (copies off)",
        "server_cpu_us_per_msg",
    );
    let p99 = value(results, "latency", "tidegate (receipt)", "p99_us");
    let base_p99 = value(results, "latency", "baseline wss", "p99_us");
    let broker_p99 = value(
        results,
        "publish-latency",
        scenario::publish::BARE_SERVER,
        "p99_us",
    );
    let copy_broker_p99 = value(
        results,
        "publish-latency",
        scenario::publish::COPY_SERVER,
        "p99_us",
    );
    let cold = value(results, "instantiate", "runtime (echo)", "from_zero_p99_us");
    let fresh = value(
        results,
        "instantiate",
        "runtime (echo)",
        "new_instance_p50_us",
    );
    let idle = value(
        results,
        "idle",
        "tidegate (receipt)",
        "bytes_per_connection",
    );
    let base_idle = value(results, "idle", "baseline wss", "bytes_per_connection");
    let cluster = |name| value(results, "cluster", "tidegate (3 nodes)", name);
    let same_node_p99 = cluster("same_node_send_p99_us");
    let cross_node_p99 = cluster("cross_node_send_p99_us");
    let per_broadcast = cluster("broker_deliveries_per_broadcast");
    let propagation = cluster("registry_propagation_ms");
    let connects = value(results, "connect", "tidegate (receipt)", "connects_per_s");
    let base_connects = value(results, "connect", "baseline wss", "connects_per_s");
    let calm_p99 = value(results, "isolation", "tidegate (copies off)", "calm_p99_us");
    let faulting_p99 = value(
        results,
        "isolation",
        "tidegate (copies off)",
        "faulting_p99_us",
    );
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let show = |v: Option<f64>, unit: &str| v.map_or("n/a".into(), |v| format!("{v:.0} {unit}"));
    vec![
        Check {
            what: "receipt-mode echo vs the broker's confirmed publish ceiling",
            measured: receipt,
            unit: "msgs/s",
            reference: show(ceiling, "msgs/s"),
            ratio: ratio(receipt, ceiling),
            target: ">= 0.9x",
            met: ratio(receipt, ceiling).map(|r| r >= 0.9),
        },
        Check {
            what: "receipt-mode echo vs the broker's ceiling for messages with a copy's properties",
            measured: receipt,
            unit: "msgs/s",
            reference: show(copy_ceiling, "msgs/s"),
            ratio: ratio(receipt, copy_ceiling),
            target: ">= 0.9x",
            met: ratio(receipt, copy_ceiling).map(|r| r >= 0.9),
        },
        Check {
            what: "receipt-mode p99 at half that rate",
            measured: p99,
            unit: "us",
            reference: format!(
                "baseline wss {}; broker confirms alone {} (with a copy's properties {})",
                show(base_p99, "us"),
                show(broker_p99, "us"),
                show(copy_broker_p99, "us")
            ),
            ratio: None,
            target: "< 5000 us",
            met: p99.map(|v| v < 5000.0),
        },
        Check {
            what: "function path (copies off) vs raw TLS echo",
            measured: off,
            unit: "msgs/s",
            reference: show(wss, "msgs/s"),
            ratio: ratio(off, wss),
            target: ">= 0.5x",
            met: ratio(off, wss).map(|r| r >= 0.5),
        },
        Check {
            what: "gateway CPU per 64-byte message (copies off)",
            measured: off_cpu,
            unit: "us",
            reference: String::new(),
            ratio: None,
            target: "< 3 us",
            met: off_cpu.map(|v| v < 3.0),
        },
        Check {
            what: "cold start from zero, p99 (runtime)",
            measured: cold,
            unit: "us",
            reference: String::new(),
            ratio: None,
            target: "< 1000 us",
            met: cold.map(|v| v < 1000.0),
        },
        Check {
            what: "new instance and call, p50 (runtime)",
            measured: fresh,
            unit: "us",
            reference: String::new(),
            ratio: None,
            target: "< 10 us",
            met: fresh.map(|v| v < 10.0),
        },
        Check {
            what: "memory per idle TLS connection",
            measured: idle,
            unit: "bytes",
            reference: format!("baseline wss {}", show(base_idle, "bytes")),
            ratio: ratio(idle, base_idle),
            target: "< 16384 bytes",
            met: idle.map(|v| v < 16384.0),
        },
        Check {
            what: "p99 of well-behaved clients while a function faults",
            measured: faulting_p99,
            unit: "us",
            reference: format!("same load, no faults {}", show(calm_p99, "us")),
            ratio: ratio(faulting_p99, calm_p99),
            target: "<= 2x",
            met: ratio(faulting_p99, calm_p99).map(|r| r <= 2.0),
        },
        Check {
            what: "TLS connections per second vs raw rustls acceptor",
            measured: connects,
            unit: "/s",
            reference: show(base_connects, "/s"),
            ratio: ratio(connects, base_connects),
            target: ">= 0.8x",
            met: ratio(connects, base_connects).map(|r| r >= 0.8),
        },
        Check {
            what: "cluster: send to a connection on another node, p99",
            measured: cross_node_p99,
            unit: "us",
            reference: format!("same node {}", show(same_node_p99, "us")),
            ratio: ratio(cross_node_p99, same_node_p99),
            target: "< 5000 us",
            met: cross_node_p99.map(|v| v < 5000.0),
        },
        Check {
            what: "cluster: broker deliveries per broadcast (members on 3 nodes)",
            measured: per_broadcast,
            unit: "",
            reference: "one per node with members: 3".into(),
            ratio: None,
            target: "<= 3",
            met: per_broadcast.map(|v| v <= 3.0),
        },
        Check {
            what: "cluster: registry propagation (upload's 201 to every node serving it)",
            measured: propagation,
            unit: "ms",
            reference: String::new(),
            ratio: None,
            target: "< 1000 ms",
            met: propagation.map(|v| v < 1000.0),
        },
    ]
}

fn markdown(results: &[Figures], quick: bool) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Tidegate benchmark report\n");
    if quick {
        let _ = writeln!(
            md,
            "**Quick run** (short durations, 1,000 idle connections): a set-up check, not figures to quote.\n"
        );
    }
    let _ = writeln!(
        md,
        "Every figure was measured in the same run on the same machine; the load generator runs on one \
         thread (pinned to CPU 0 when `taskset` exists) and each server on the other core.\n"
    );
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "| check | measured | reference | ratio | target | met |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for check in checks(results) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            check.what,
            check
                .measured
                .map_or("n/a".into(), |v| format!("{v:.1} {}", check.unit)),
            check.reference,
            check.ratio.map_or(String::new(), |r| format!("{r:.2}x")),
            check.target,
            match check.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            }
        );
    }
    let _ = writeln!(md, "\n## All figures\n");
    let _ = writeln!(md, "| scenario | server | parameters | figure | value |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for figures in results {
        for (name, value) in &figures.values {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.2} |",
                figures.scenario, figures.server, figures.parameters, name, value
            );
        }
    }
    let _ = writeln!(md, "\n![throughput and latency](chart.png)");
    md
}

pub(crate) fn register_font() -> anyhow::Result<()> {
    let bytes = FONTS
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .context("no DejaVu Sans font found for the chart (apt-get install fonts-dejavu-core)")?;
    // The font lives as long as the process: plotters keeps a reference.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("the chart font could not be loaded"))
}

fn chart(path: &Path, results: &[Figures]) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);

    // Throughput.
    let bars: Vec<(&str, f64)> = [
        (
            "raw ws",
            value(results, "echo", "baseline ws", "msgs_per_s"),
        ),
        (
            "raw wss",
            value(results, "echo", "baseline wss", "msgs_per_s"),
        ),
        (
            "tidegate off",
            value(results, "echo", "tidegate (copies off)", "msgs_per_s"),
        ),
        (
            "tidegate receipt",
            value(results, "echo", "tidegate (receipt)", "msgs_per_s"),
        ),
        (
            "broker ceiling",
            value(
                results,
                "publish",
                scenario::publish::BARE_SERVER,
                "msgs_per_s",
            ),
        ),
        (
            "broker, copy props",
            value(
                results,
                "publish",
                scenario::publish::COPY_SERVER,
                "msgs_per_s",
            ),
        ),
    ]
    .into_iter()
    .filter_map(|(name, v)| Some((name, v?)))
    .collect();
    let top = bars.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 2.0;
    let mut throughput = ChartBuilder::on(&left)
        .caption(
            "Echo throughput, 64 B, C=64, W=16 (msgs/s, log)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (0..bars.len().saturating_sub(1)).into_segmented(),
            (1000.0..top).log_scale(),
        )?;
    throughput
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.0.to_owned()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .label_style(("sans-serif", 14))
        .draw()?;
    throughput.draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
        let color = if name.starts_with("tidegate") {
            BLUE.mix(0.7)
        } else {
            BLACK.mix(0.4)
        };
        Rectangle::new(
            [
                (SegmentValue::Exact(i), 1000.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color.filled(),
        )
    }))?;

    // Latency percentiles at the same offered rate.
    let series: Vec<(&str, RGBAColor, Vec<f64>)> = [
        ("raw wss", "latency", "baseline wss", BLACK.mix(0.6)),
        (
            "broker confirms",
            "publish-latency",
            scenario::publish::BARE_SERVER,
            RED.mix(0.6),
        ),
        (
            "broker, copy props",
            "publish-latency",
            scenario::publish::COPY_SERVER,
            MAGENTA.mix(0.6),
        ),
        (
            "tidegate receipt",
            "latency",
            "tidegate (receipt)",
            BLUE.mix(0.8),
        ),
    ]
    .into_iter()
    .filter_map(|(name, scenario, server, color)| {
        let f = find(results, scenario, server)?;
        Some((
            name,
            color,
            vec![f.get("p50_us")?, f.get("p99_us")?, f.get("p99_9_us")?],
        ))
    })
    .collect();
    let top = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(1.0, f64::max)
        * 2.0;
    let mut latency = ChartBuilder::on(&right)
        .caption(
            "Latency at half the receipt-mode rate (us, log)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0usize..2usize, (10.0..top).log_scale())?;
    let quantiles = ["p50", "p99", "p99.9"];
    latency
        .configure_mesh()
        .x_labels(3)
        .x_label_formatter(&|x| quantiles.get(*x).copied().unwrap_or("").to_owned())
        .label_style(("sans-serif", 14))
        .draw()?;
    for (name, color, values) in &series {
        let color = *color;
        latency
            .draw_series(LineSeries::new(
                values.iter().enumerate().map(|(i, v)| (i, *v)),
                color.stroke_width(3),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        latency.draw_series(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| Circle::new((i, *v), 4, color.filled())),
        )?;
    }
    latency
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::checks;
    use crate::figures::Figures;
    use crate::scenario::publish::{BARE_SERVER, COPY_SERVER};

    fn figure(scenario: &str, server: &str, name: &str, value: f64) -> Figures {
        let mut figures = Figures::new(scenario, server, String::new());
        figures.set(name, value);
        figures
    }

    #[test]
    fn receipt_mode_is_compared_with_both_broker_ceilings() {
        let results = [
            figure("publish", BARE_SERVER, "msgs_per_s", 20_000.0),
            figure("publish", COPY_SERVER, "msgs_per_s", 16_000.0),
            figure("echo", "tidegate (receipt)", "msgs_per_s", 15_200.0),
        ];
        let checks = checks(&results);
        let ratio = |what: &str| {
            checks
                .iter()
                .find(|c| c.what == what)
                .and_then(|c| Some((c.ratio?, c.met?)))
        };
        assert_eq!(
            ratio("receipt-mode echo vs the broker's confirmed publish ceiling"),
            Some((0.76, false))
        );
        assert_eq!(
            ratio(
                "receipt-mode echo vs the broker's ceiling for messages with a copy's properties"
            ),
            Some((0.95, true))
        );
    }
}
