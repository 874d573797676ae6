//! SVG plot of latency-critical SLO attainment against load for every simulated policy
//! (plotters' SVG backend: no system libraries needed).

use plotters::prelude::*;

use super::Report;

const COLOURS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The plot as an SVG document.
pub fn slo_attainment_svg(report: &Report) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (plot, footer) = root.split_vertically(540);
        let scales: Vec<f64> = report.sweep.iter().map(|p| p.load_scale).collect();
        let lo = scales.iter().copied().fold(f64::INFINITY, f64::min).log2();
        let hi = scales
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
            .log2();
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            (lo - 0.5, hi + 0.5)
        };
        let mut chart = ChartBuilder::on(&plot)
            .caption(
                format!(
                    "Latency-critical TTFT SLO attainment vs load ({} GPU + {} WSE workers)",
                    report.gpu_workers, report.wse_workers
                ),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(lo..hi, 0.0..1.02)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("load scale (x trace arrival rate, log2 axis)")
            .y_desc("SLO attainment (latency-critical)")
            .x_label_formatter(&|x| format!("{:.3}", 2f64.powf(*x)))
            .draw()
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = report
            .sweep
            .first()
            .map(|p| p.policies.keys().cloned().collect())
            .unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<(f64, f64)> = report
                .sweep
                .iter()
                .filter_map(|p| {
                    let lane = p.policies.get(name)?.lanes.get("latency_critical")?;
                    Some((p.load_scale.log2(), lane.slo_attainment))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, colour.filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, line) in super::ATTRIBUTION.iter().enumerate() {
            footer
                .draw(&Text::new(
                    line.to_string(),
                    (10, 8 + 22 * i as i32),
                    ("sans-serif", 11),
                ))
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
