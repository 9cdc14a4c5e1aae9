//! An SVG of a metrics log, written by hand: the training loss per step on top (each step
//! as a faint point, a trailing moving average per task as a line) and the dev scores per
//! evaluation below (the GLUE average thick and black, each task thin in its colour), both
//! against the step on one shared x axis, with a legend on the right.
//!
//! Every coordinate is finite whatever the log holds: empty, one point, constant values or
//! NaN losses (those are skipped). A raw series is thinned to at most `MAX_POINTS` points
//! so a 60,000-step log stays a small file.

use std::fmt::Write;
use std::path::Path;

use super::log::LogRecords;
use super::write_atomic;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 760.0;
const LEFT: f64 = 70.0;
const PLOT_WIDTH: f64 = 720.0;
const LEGEND_X: f64 = 820.0;
const LOSS_TOP: f64 = 40.0;
const DEV_TOP: f64 = 420.0;
const PANEL_HEIGHT: f64 = 290.0;

/// Raw loss points drawn per task at most.
const MAX_POINTS: usize = 3000;
/// Steps of a task the moving average spans at most.
const MAX_WINDOW: usize = 100;

/// GLUE order first; unknown names follow, alphabetically.
const TASK_ORDER: &[&str] =
    &["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI"];
const PALETTE: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#393b79", "#637939",
];

/// The SVG of `records`, as text.
pub fn render_svg(records: &LogRecords) -> String {
    let tasks = task_names(records);
    let colour = |task: &str| PALETTE[tasks.iter().position(|t| t == task).unwrap_or(0) % PALETTE.len()];
    let steps = step_range(records);

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    loss_panel(&mut out, records, &tasks, &colour, steps);
    dev_panel(&mut out, records, &tasks, &colour, steps);
    legend(&mut out, &tasks, &colour);
    out.push_str("</svg>\n");
    out
}

/// Writes the SVG of `records` to `path` atomically (a temporary file, then a rename).
pub fn write_svg(path: &Path, records: &LogRecords) -> std::io::Result<()> {
    write_atomic(path, render_svg(records).as_bytes())
}

/// The task names of both panels, in GLUE order.
fn task_names(records: &LogRecords) -> Vec<String> {
    let mut names: Vec<String> = records.steps.iter().map(|s| s.task.clone()).collect();
    names.extend(records.evals.iter().flat_map(|e| e.tasks.keys().cloned()));
    let rank = |name: &str| TASK_ORDER.iter().position(|t| *t == name).unwrap_or(TASK_ORDER.len());
    names.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    names.dedup();
    names
}

/// The steps both panels span.
fn step_range(records: &LogRecords) -> (f64, f64) {
    let steps = records.steps.iter().map(|s| s.step).chain(records.evals.iter().map(|e| e.step));
    let (lo, hi) = steps.fold((u32::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    if lo > hi { (0.0, 1.0) } else { (f64::from(lo), f64::from(hi)) }
}

/// An axis: the value range it shows and its tick values.
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

/// A tidy axis over [lo, hi]: about five ticks at 1, 2 or 5 × 10^k, the ends rounded out to
/// ticks. An empty or non-finite range becomes [0, 1]; a single value is widened.
fn nice_axis(lo: f64, hi: f64) -> Axis {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() && lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    if hi - lo <= 1e-12 * hi.abs().max(1.0) {
        let pad = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        (lo, hi) = (lo - pad, hi + pad);
    }
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    let (first, last) = ((lo / step).floor(), (hi / step).ceil());
    let ticks = (0..=(last - first) as i64).map(|i| (first + i as f64) * step).collect();
    Axis { lo: first * step, hi: last * step, step, ticks }
}

impl Axis {
    fn label(&self, value: f64) -> String {
        let decimals = (-self.step.log10().floor()).max(0.0) as usize;
        let text = format!("{value:.decimals$}");
        if text.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
            "0".to_string()
        } else {
            text
        }
    }
}

/// A panel: its place on the page and the axes mapping data to it.
struct Frame {
    top: f64,
    x: Axis,
    y: Axis,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + PLOT_WIDTH * (x - self.x.lo) / (self.x.hi - self.x.lo)
    }

    /// Values beyond the axis are drawn on its edge.
    fn py(&self, y: f64) -> f64 {
        let t = ((y - self.y.lo) / (self.y.hi - self.y.lo)).clamp(0.0, 1.0);
        self.top + PANEL_HEIGHT * (1.0 - t)
    }

    fn draw(&self, out: &mut String, title: &str, x_label: &str, y_label: &str) {
        let (top, bottom, right) = (self.top, self.top + PANEL_HEIGHT, LEFT + PLOT_WIDTH);
        for &t in &self.y.ticks {
            let y = self.py(t);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e5e5e5"/>"##
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                self.y.label(t)
            );
        }
        for &t in &self.x.ticks {
            let x = self.px(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}" stroke="#333"/>"##,
                bottom + 5.0
            );
            let _ = writeln!(
                out,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                bottom + 18.0,
                self.x.label(t)
            );
        }
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{PLOT_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
            LEFT + PLOT_WIDTH / 2.0,
            top - 10.0,
            escape(title)
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + PLOT_WIDTH / 2.0,
            bottom + 34.0,
            escape(x_label)
        );
        let (lx, ly) = (LEFT - 50.0, top + PANEL_HEIGHT / 2.0);
        let _ = writeln!(
            out,
            r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
            escape(y_label)
        );
    }

    fn no_data(&self, out: &mut String) {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#999">no data</text>"##,
            LEFT + PLOT_WIDTH / 2.0,
            self.top + PANEL_HEIGHT / 2.0
        );
    }

    /// A polyline through `points` (data coordinates).
    fn polyline(&self, out: &mut String, points: &[(f64, f64)], colour: &str, width: f64, task: &str) {
        let mut coords = String::new();
        for &(x, y) in points {
            let _ = write!(coords, "{:.1},{:.1} ", self.px(x), self.py(y));
        }
        let _ = writeln!(
            out,
            r#"<polyline data-series="{}" points="{}" fill="none" stroke="{colour}" stroke-width="{width}" stroke-linejoin="round"/>"#,
            escape(task),
            coords.trim_end()
        );
    }
}

/// Every `ceil(n / max)`-th item, so at most `max` of them.
fn thin<T: Copy>(items: &[T], max: usize) -> Vec<T> {
    let stride = items.len().div_ceil(max).max(1);
    items.iter().step_by(stride).copied().collect()
}

/// Trailing means over `window` points.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

fn loss_panel(
    out: &mut String,
    records: &LogRecords,
    tasks: &[String],
    colour: &dyn Fn(&str) -> &'static str,
    steps: (f64, f64),
) {
    // (step, loss) per task, finite losses only.
    let series: Vec<(&str, Vec<(f64, f64)>)> = tasks
        .iter()
        .map(|task| {
            let points = records
                .steps
                .iter()
                .filter(|s| &s.task == task && s.loss.is_finite())
                .map(|s| (f64::from(s.step), f64::from(s.loss)))
                .collect();
            (task.as_str(), points)
        })
        .filter(|(_, points): &(&str, Vec<_>)| !points.is_empty())
        .collect();
    let averages: Vec<Vec<(f64, f64)>> =
        series.iter().map(|(_, p)| moving_average(p, (p.len() / 20).clamp(1, MAX_WINDOW))).collect();

    // The top of the axis is the 99th percentile of the raw losses (a few huge early losses
    // would flatten everything else), raised to the highest moving average if need be.
    let mut losses: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y)).collect();
    losses.sort_by(f64::total_cmp);
    let top = losses.get(losses.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(1.0);
    let top = averages.iter().flatten().map(|&(_, y)| y).fold(top, f64::max);
    let bottom = losses.first().copied().unwrap_or(0.0).min(0.0);
    let frame = Frame { top: LOSS_TOP, x: nice_axis(steps.0, steps.1), y: nice_axis(bottom, top) };
    frame.draw(out, "Training loss", "step", "loss");
    if series.is_empty() {
        frame.no_data(out);
    }
    // All points first, so no task's points cover another's line.
    for (task, points) in &series {
        let mut path = String::new();
        for &(x, y) in &thin(points, MAX_POINTS) {
            let _ = write!(path, "M{:.1} {:.1}h0", frame.px(x), frame.py(y));
        }
        let _ = writeln!(
            out,
            r#"<path data-series="{} raw" d="{path}" stroke="{}" stroke-width="3" stroke-linecap="round" stroke-opacity="0.2"/>"#,
            escape(task),
            colour(task)
        );
    }
    for ((task, _), average) in series.iter().zip(&averages) {
        frame.polyline(out, &thin(average, MAX_POINTS / 3), colour(task), 1.8, task);
    }
}

fn dev_panel(
    out: &mut String,
    records: &LogRecords,
    tasks: &[String],
    colour: &dyn Fn(&str) -> &'static str,
    steps: (f64, f64),
) {
    // (step, score × 100) per task, then the GLUE average.
    let mut series: Vec<(&str, Vec<(f64, f64)>)> = tasks
        .iter()
        .map(|task| {
            let points = records
                .evals
                .iter()
                .filter_map(|e| Some((f64::from(e.step), 100.0 * e.task_score(task)?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            (task.as_str(), points)
        })
        .filter(|(_, points): &(&str, Vec<_>)| !points.is_empty())
        .collect();
    let glue: Vec<(f64, f64)> = records
        .evals
        .iter()
        .map(|e| (f64::from(e.step), 100.0 * e.glue))
        .filter(|(_, y)| y.is_finite())
        .collect();
    if !glue.is_empty() {
        series.push(("GLUE", glue));
    }

    let values = series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let frame = Frame { top: DEV_TOP, x: nice_axis(steps.0, steps.1), y: nice_axis(lo, hi) };
    frame.draw(out, "Dev scores (x100)", "step", "score");
    if series.is_empty() {
        frame.no_data(out);
    }
    for (task, points) in &series {
        let (stroke, width, radius) =
            if *task == "GLUE" { ("#000", 2.5, 3.5) } else { (colour(task), 1.2, 2.0) };
        frame.polyline(out, points, stroke, width, task);
        for &(x, y) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="{radius}" fill="{stroke}"/>"#,
                frame.px(x),
                frame.py(y)
            );
        }
    }
}

fn legend(out: &mut String, tasks: &[String], colour: &dyn Fn(&str) -> &'static str) {
    let mut y = LOSS_TOP;
    let mut entry = |out: &mut String, fill: &str, text: &str| {
        let _ = writeln!(
            out,
            r#"<rect x="{LEGEND_X}" y="{:.1}" width="14" height="10" fill="{fill}"/>"#,
            y - 9.0
        );
        let _ = writeln!(out, r#"<text x="{:.1}" y="{y:.1}">{}</text>"#, LEGEND_X + 20.0, escape(text));
        y += 18.0;
    };
    for task in tasks {
        entry(out, colour(task), task);
    }
    entry(out, "#000", "GLUE average");
    let window = format!("up to {MAX_WINDOW} steps of the task");
    let notes = ["loss: points = steps,", "line = trailing mean over", window.as_str()];
    for (i, note) in notes.iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="{LEGEND_X}" y="{:.1}" fill="#555" font-size="11">{note}</text>"##,
            y + 10.0 + 14.0 * i as f64
        );
    }
}

/// Text safe inside an SVG element or attribute.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
