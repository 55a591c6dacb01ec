//! The soak's samples as a picture: resident memory, open files and spool
//! per node, and the copies queue's depth, over the run.

use std::path::Path;

use plotters::prelude::*;

use crate::soak::Sample;

/// Draw `samples` to `path` (PNG), four panels.
///
/// # Errors
/// When no font is found or the file cannot be written.
pub fn plot(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    crate::report::register_font()?;
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let end = samples.last().map_or(1.0, |s| s.seconds).max(1.0);
    let nodes = samples.first().map_or(0, |s| s.nodes.len());
    let colors = [BLUE, RED, GREEN];
    type Series = Box<dyn Fn(&Sample) -> Vec<f64>>;
    let views: [(&str, Series); 4] = [
        (
            "Resident memory per node (MiB)",
            Box::new(|s: &Sample| {
                s.nodes
                    .iter()
                    .map(|n| n.rss_bytes as f64 / 1048576.0)
                    .collect()
            }),
        ),
        (
            "Open files per node",
            Box::new(|s: &Sample| s.nodes.iter().map(|n| n.open_files as f64).collect()),
        ),
        (
            "Spooled copies per node",
            Box::new(|s: &Sample| s.nodes.iter().map(|n| n.spool_messages).collect()),
        ),
        (
            "Copies queue depth",
            Box::new(|s: &Sample| vec![s.queue_depth as f64]),
        ),
    ];
    for (panel, (title, series)) in panels.iter().zip(views) {
        let values: Vec<Vec<f64>> = samples.iter().map(&series).collect();
        let top = values.iter().flatten().copied().fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .label_style(("sans-serif", 13))
            .draw()?;
        // When the broker was down.
        let down: Vec<f64> = samples
            .iter()
            .filter(|s| !s.broker_up)
            .map(|s| s.seconds)
            .collect();
        if let (Some(from), Some(to)) = (down.first(), down.last()) {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(*from, 0.0), (*to, top)],
                BLACK.mix(0.08).filled(),
            )))?;
        }
        let lines = values.first().map_or(0, Vec::len).min(nodes.max(1));
        for line in 0..lines {
            let color = colors[line % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    samples
                        .iter()
                        .zip(&values)
                        .map(|(s, v)| (s.seconds, v.get(line).copied().unwrap_or(0.0))),
                    color.stroke_width(2),
                ))?
                .label(if lines == 1 {
                    "queue".to_owned()
                } else {
                    format!("node {}", line + 1)
                })
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
