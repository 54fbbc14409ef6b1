//! A plot of a simulation as an SVG document: hosts per group over time, the executions
//! running and waiting for a host, and how well they pack the hosts. Plain polylines and text, so that
//! it needs no font files and no plotting library.

use std::fmt::Write;

use super::Sample;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 200.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;
const COLOURS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
];

/// One panel: named series of (x, y) points over a shared x range.
struct Panel<'a> {
    title: &'a str,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

/// The SVG document for `samples` of a run whose groups are `groups` (in the samples'
/// order).
pub fn plot(samples: &[Sample], groups: &[String], title: &str) -> String {
    let minutes = |s: &Sample| s.at as f64 / 60_000.0;
    let hosts = Panel {
        title: "hosts per group (launched, not gone)",
        series: groups
            .iter()
            .enumerate()
            .map(|(g, name)| {
                let points = samples
                    .iter()
                    .map(|s| (minutes(s), s.hosts.get(g).copied().unwrap_or(0) as f64))
                    .collect();
                (name.clone(), points)
            })
            .collect(),
    };
    let work = Panel {
        title: "executions",
        series: vec![
            (
                "running".to_string(),
                samples
                    .iter()
                    .map(|s| (minutes(s), s.running as f64))
                    .collect(),
            ),
            (
                "waiting for a host".to_string(),
                samples
                    .iter()
                    .map(|s| (minutes(s), s.queued as f64))
                    .collect(),
            ),
        ],
    };
    let packing = Panel {
        title: "packing: memory of running limits / memory of reporting hosts (%)",
        series: vec![(
            "packing".to_string(),
            samples
                .iter()
                .filter(|s| s.provisioned_memory > 0)
                .map(|s| {
                    (
                        minutes(s),
                        100.0 * s.used_memory as f64 / s.provisioned_memory as f64,
                    )
                })
                .collect(),
        )],
    };
    let panels = [hosts, work, packing];
    let x_max = samples.last().map_or(1.0, minutes).max(1.0);
    let height = TOP + panels.len() as f64 * (PANEL + GAP) - GAP + 50.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP);
        draw(&mut svg, panel, top, x_max);
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">virtual time (minutes)</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        height - 12.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn draw(svg: &mut String, panel: &Panel, top: f64, x_max: f64) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let y_max = panel
        .series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0f64, f64::max);
    let y_max = nice(y_max);
    let x = |v: f64| LEFT + v / x_max * plot_w;
    let y = |v: f64| top + PANEL - v / y_max * PANEL;
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
        top - 8.0,
        escape(panel.title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="none" stroke="#888"/>"##
    );
    for k in 0..=4 {
        let v = y_max * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y0}" y2="{y0}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y(v) + 4.0,
            v.round(),
            y0 = y(v),
        );
    }
    let x_step = nice(x_max / 8.0).max(1.0);
    let mut t = 0.0;
    while t <= x_max {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x(t),
            top + PANEL + 16.0,
            t.round()
        );
        t += x_step;
    }
    for (i, (name, points)) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut path = String::new();
        for (px, py) in points {
            let _ = write!(path, "{:.1},{:.1} ", x(*px), y(*py));
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            path.trim_end()
        );
        let ly = top + 14.0 + i as f64 * 18.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            LEFT + plot_w + 12.0,
            LEFT + plot_w + 32.0,
            LEFT + plot_w + 38.0,
            ly + 4.0,
            escape(name)
        );
    }
}

/// The smallest of 1, 2, 5 × 10ⁿ at least `v`.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_rounds_up_to_one_two_five() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(120.0), 200.0);
        assert_eq!(nice(500.0), 500.0);
    }

    #[test]
    fn the_plot_has_a_line_per_group_two_for_the_work_and_one_for_packing() {
        let samples: Vec<Sample> = (0..5)
            .map(|i| Sample {
                at: i * 60_000,
                hosts: vec![i as u32, 1],
                ready: vec![0, 0],
                queued: 3,
                running: i as u32,
                used_memory: 1,
                provisioned_memory: 2,
                reserved_memory: 0,
                active_users: 0,
            })
            .collect();
        let svg = plot(&samples, &["a".into(), "b<c".into()], "t");
        assert_eq!(svg.matches("<polyline").count(), 5);
        assert!(svg.contains(">packing</text>"));
        assert!(svg.contains("b&lt;c"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
