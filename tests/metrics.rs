//! GLUE metrics against hand-computed values, the learning-rate schedule, the metrics log
//! round trip and crash tolerance, and the SVG plot. Host only: no GPU.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pals::train::metrics::{
    accuracy, average_ranks, f1, macro_f1, matthews, paper_average, pearson, score_accuracy_macro_f1,
    spearman,
};
use pals::train::schedule::warmup_steps;
use pals::train::{
    EvalRecord, LogRecords, LogWriter, StepRecord, TaskScore, baseline, format_table, glue_average, lr,
    render_svg, score_classification, score_regression, write_svg,
};

fn close(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() < 1e-12, "{what}: got {got}, want {want}");
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("metrics-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------- metrics

// Labels 1 1 1 1 1 1 0 0 0 0, predictions 1 1 1 1 0 0 1 0 0 0:
// TP 4, FN 2, FP 1, TN 3.
const LABELS: [u32; 10] = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0];
const PREDS: [u32; 10] = [1, 1, 1, 1, 0, 0, 1, 0, 0, 0];

#[test]
fn binary_metrics_by_hand() {
    // accuracy (TP + TN) / n = 7/10.
    close("accuracy", accuracy(&PREDS, &LABELS), 0.7);
    // F1 = 2TP / (2TP + FP + FN) = 8/11 (precision 4/5, recall 4/6).
    close("f1", f1(&PREDS, &LABELS), 8.0 / 11.0);
    // MCC = (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 − 2)/√(5·6·4·5) = 1/√6.
    close("mcc", matthews(&PREDS, &LABELS), 1.0 / 6f64.sqrt());
    // Swapping the classes changes F1 (now of the old class 0: TP 3, FP 2, FN 1 → 6/9) but
    // not MCC.
    let flip = |v: &[u32]| v.iter().map(|&c| 1 - c).collect::<Vec<_>>();
    close("f1 flipped", f1(&flip(&PREDS), &flip(&LABELS)), 6.0 / 9.0);
    close("mcc flipped", matthews(&flip(&PREDS), &flip(&LABELS)), 1.0 / 6f64.sqrt());
    // Perfectly wrong predictions: MCC −1.
    close("mcc inverted", matthews(&flip(&LABELS), &LABELS), -1.0);
}

#[test]
fn multiclass_matthews_by_hand() {
    // labels 0 1 2 0 1 2, preds 0 1 1 0 2 2: correct c = 4, n = 6, class counts t = p = (2,2,2).
    // (c·n − Σ p_k t_k) / √((n² − Σ p_k²)(n² − Σ t_k²)) = (24 − 12) / √(24·24) = 0.5.
    close("mcc 3 classes", matthews(&[0, 1, 1, 0, 2, 2], &[0, 1, 2, 0, 1, 2]), 0.5);
}

#[test]
fn macro_f1_by_hand() {
    // labels 0 1 1 2, preds 0 0 1 2: class 0 TP 1 FP 1 → 2/3; class 1 TP 1 FN 1 → 2/3;
    // class 2 → 1. The mean: 7/9.
    close("macro-F1", macro_f1(&[0, 0, 1, 2], &[0, 1, 1, 2]), 7.0 / 9.0);
    // Classes in neither labels nor predictions (1, 2) do not count; class 3, predicted but
    // never right, counts as 0 (as sklearn's average="macro"): (2/3 + 0) / 2.
    close("macro-F1 unseen", macro_f1(&[0, 3], &[0, 0]), 1.0 / 3.0);
    // Two classes: the mean of F1 of class 1 (8/11) and of class 0 (6/9).
    close("macro-F1 binary", macro_f1(&PREDS, &LABELS), (8.0 / 11.0 + 6.0 / 9.0) / 2.0);
    close("macro-F1 empty", macro_f1(&[], &[]), 0.0);
    // A custom classification task's score is its accuracy; macro-F1 is logged beside it.
    let custom = score_accuracy_macro_f1("reviews", &[0, 0, 1, 2], &[0, 1, 1, 2]);
    assert_eq!(custom.metric("acc"), Some(0.75));
    close("custom macro-F1", custom.metric("macro_f1").unwrap(), 7.0 / 9.0);
    assert_eq!(custom.score, 0.75);
}

#[test]
fn correlations_by_hand() {
    let x = [1.0, 2.0, 3.0, 4.0, 5.0];
    let y = [2.0, 4.0, 5.0, 4.0, 5.0];
    // dx = (−2,−1,0,1,2), dy = (−2,0,1,0,1): Σdxdy = 6, Σdx² = 10, Σdy² = 6 → 6/√60.
    close("pearson", pearson(&x, &y), 6.0 / 60f64.sqrt());
    // y's ranks with ties averaged: 2 → 1, 4,4 → 2.5, 5,5 → 4.5.
    assert_eq!(average_ranks(&y), vec![1.0, 2.5, 4.5, 2.5, 4.5]);
    // dr = (−2,−0.5,1.5,−0.5,1.5): Σdx·dr = 7, Σdr² = 9 → 7/√90 (scipy: 0.7378647873726218).
    close("spearman", spearman(&x, &y), 7.0 / 90f64.sqrt());
    assert!((spearman(&x, &y) - 0.7378647873726218).abs() < 1e-12);
    // Spearman only sees the order: a monotone transform gives 1.
    let cubes: Vec<f32> = x.iter().map(|v| v * v * v).collect();
    close("spearman monotone", spearman(&x, &cubes), 1.0);
    close("pearson anti", pearson(&x, &[5.0, 4.0, 3.0, 2.0, 1.0]), -1.0);
}

#[test]
fn degenerate_cases_are_zero_not_nan() {
    // All one class everywhere: MCC undefined → 0; F1 has no positives → 0.
    close("mcc all ones", matthews(&[1, 1, 1], &[1, 1, 1]), 0.0);
    close("mcc constant prediction", matthews(&[0; 4], &[0, 1, 0, 1]), 0.0);
    close("f1 no positives", f1(&[0, 0], &[0, 0]), 0.0);
    close("accuracy all right", accuracy(&[1, 1, 1], &[1, 1, 1]), 1.0);
    // Constant predictions: correlations undefined → 0.
    close("pearson constant", pearson(&[2.5; 4], &[1.0, 2.0, 3.0, 4.0]), 0.0);
    close("spearman constant", spearman(&[2.5; 4], &[1.0, 2.0, 3.0, 4.0]), 0.0);
    close("pearson one value", pearson(&[1.0], &[2.0]), 0.0);
    close("pearson NaN prediction", pearson(&[f32::NAN, 1.0], &[1.0, 2.0]), 0.0);
    // Empty sets.
    for score in [accuracy(&[], &[]), f1(&[], &[]), matthews(&[], &[]), pearson(&[], &[]), spearman(&[], &[])]
    {
        close("empty", score, 0.0);
    }
    assert_eq!(glue_average(&[]), 0.0);
}

#[test]
#[should_panic(expected = "predictions for")]
fn mismatched_lengths_panic() {
    accuracy(&[0, 1], &[0]);
}

#[test]
fn task_scores_follow_glue() {
    let cola = score_classification("CoLA", &PREDS, &LABELS);
    assert_eq!(cola.metrics.len(), 1);
    close("CoLA mcc", cola.metric("mcc").unwrap(), 1.0 / 6f64.sqrt());
    close("CoLA score", cola.score, 1.0 / 6f64.sqrt());

    let mrpc = score_classification("MRPC", &PREDS, &LABELS);
    assert_eq!(mrpc.metric("f1"), Some(8.0 / 11.0));
    assert_eq!(mrpc.metric("acc"), Some(0.7));
    close("MRPC score", mrpc.score, (8.0 / 11.0 + 0.7) / 2.0);
    assert_eq!(score_classification("qqp", &PREDS, &LABELS).score, mrpc.score);

    for task in ["SST-2", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI"] {
        let s = score_classification(task, &PREDS, &LABELS);
        assert_eq!(s.metrics, vec![("acc".to_string(), 0.7)], "{task}");
        assert_eq!(s.task, task);
    }

    let x = [1.0, 2.0, 3.0, 4.0, 5.0];
    let y = [2.0, 4.0, 5.0, 4.0, 5.0];
    let sts = score_regression("STS-B", &x, &y);
    close("STS-B score", sts.score, (6.0 / 60f64.sqrt() + 7.0 / 90f64.sqrt()) / 2.0);

    let all = [cola.clone(), mrpc.clone(), sts.clone()];
    close("average", glue_average(&all), (cola.score + mrpc.score + sts.score) / 3.0);
}

#[test]
#[should_panic(expected = "regression task")]
fn sts_b_is_not_a_classification() {
    score_classification("STS-B", &[0], &[0]);
}

fn row(task: &str, metrics: &[(&str, f64)]) -> TaskScore {
    let metrics: Vec<(String, f64)> = metrics.iter().map(|&(n, v)| (n.to_string(), v / 100.0)).collect();
    let score = metrics.iter().map(|(_, v)| v).sum::<f64>() / metrics.len() as f64;
    TaskScore { task: task.to_string(), metrics, score }
}

#[test]
fn paper_average_reproduces_the_pals_row() {
    // PALs (204) on the GLUE test server: avg 80.4.
    let pals = [
        row("MNLI-m", &[("acc", 84.3)]),
        row("MNLI-mm", &[("acc", 83.5)]),
        row("QQP", &[("f1", 71.5), ("acc", 89.2)]),
        row("QNLI", &[("acc", 90.0)]),
        row("SST-2", &[("acc", 92.6)]),
        row("CoLA", &[("mcc", 51.2)]),
        row("STS-B", &[("pearson", 86.0), ("spearman", 85.8)]),
        row("MRPC", &[("f1", 88.7), ("acc", 84.6)]),
        row("RTE", &[("acc", 76.0)]),
        row("WNLI", &[("acc", 65.1)]),
    ];
    assert!((100.0 * paper_average(&pals) - 80.4).abs() < 0.05, "{}", paper_average(&pals));
    let table = format_table(&pals);
    assert!(
        table.contains("MRPC") && table.contains("f1 88.70  acc 84.60") && table.contains("86.65"),
        "{table}"
    );
    assert!(table.contains("GLUE average"), "{table}");
    print!("{table}");
}

#[test]
fn baselines() {
    // CoLA: majority class → constant prediction → MCC 0.
    let cola = baseline("CoLA", &[1u32, 1, 0], &[0u32, 1, 1, 1]);
    close("CoLA baseline", cola.score, 0.0);
    // SST-2: train majority 0 (3 of 5); dev has two 0s of five.
    close("SST-2 baseline", baseline("SST-2", &[0u32, 0, 0, 1, 1], &[0u32, 1, 1, 0, 1]).score, 0.4);
    // MRPC: predict 1 everywhere; dev 3 positives of 4 → acc 3/4, F1 = 6/(6+1) = 6/7.
    let mrpc = baseline("MRPC", &[1u32, 1, 0], &[1u32, 1, 0, 1]);
    close("MRPC baseline", mrpc.score, (0.75 + 6.0 / 7.0) / 2.0);
    // A tie picks the smaller class.
    close("tie", baseline("RTE", &[0u32, 1], &[0u32, 1, 1]).score, 1.0 / 3.0);
    // STS-B: the train mean, a constant → both correlations 0.
    let sts = baseline("STS-B", &[1.0f32, 2.0, 4.5], &[0.0f32, 3.0, 5.0]);
    assert_eq!(sts.metrics, vec![("pearson".to_string(), 0.0), ("spearman".to_string(), 0.0)]);
}

// ---------------------------------------------------------------- schedule

#[test]
fn schedule_warms_up_then_decays_to_zero() {
    let peak = 2e-5f32;
    let at = |step| lr(step, 100, 0.1, peak);
    assert_eq!(warmup_steps(100, 0.1), 10);
    // Step 0 already trains, at 1/10 of the peak.
    close("start", f64::from(at(0)), f64::from(peak / 10.0));
    close("warmup middle", f64::from(at(4)), f64::from(peak) * 0.5);
    close("end of warmup", f64::from(at(9)), f64::from(peak));
    close("first decay step", f64::from(at(10)), f64::from(peak));
    // Decay: peak·(100 − s)/90.
    close("middle of decay", f64::from(at(55)), f64::from(peak) * 0.5);
    close("last step", f64::from(at(99)), f64::from(peak) / 90.0);
    assert!(at(99) > 0.0);
    assert_eq!(at(100), 0.0);
    assert_eq!(at(1000), 0.0);
    // Monotone up, then monotone down.
    for s in 0..99 {
        if s < 9 {
            assert!(at(s) < at(s + 1), "step {s}");
        } else {
            assert!(at(s) >= at(s + 1), "step {s}");
        }
    }
    // No warmup, all warmup, no steps.
    assert_eq!(lr(0, 100, 0.0, peak), peak);
    close("all warmup last", f64::from(lr(99, 100, 1.0, peak)), f64::from(peak));
    assert_eq!(lr(0, 0, 0.1, peak), 0.0);
    assert!(lr(0, 1, 0.1, peak) > 0.0);
}

// ---------------------------------------------------------------- log

fn step(step: u32, task: &str, loss: f32) -> StepRecord {
    StepRecord {
        step,
        task: task.to_string(),
        loss,
        lr: lr(step, 10, 0.1, 2e-5),
        time: 0.5 * f64::from(step),
        scale: None,
        skipped: None,
    }
}

fn eval(eval: u32, step: u32, cola: f64) -> EvalRecord {
    let scores = [
        TaskScore { task: "CoLA".into(), metrics: vec![("mcc".into(), cola)], score: cola },
        score_classification("MRPC", &PREDS, &LABELS),
    ];
    EvalRecord::new(eval, step, &scores)
}

#[test]
fn log_round_trip() {
    let path = scratch("round-trip").join("log.jsonl");
    let mut writer = LogWriter::create(&path).unwrap();
    let steps: Vec<StepRecord> =
        (0..6).map(|s| step(s, ["CoLA", "MRPC"][s as usize % 2], 0.7 - 0.1 * s as f32)).collect();
    for s in &steps[..3] {
        writer.step(s.clone()).unwrap();
    }
    writer.eval(eval(0, 3, 0.25)).unwrap();
    for s in &steps[3..] {
        writer.step(s.clone()).unwrap();
    }
    drop(writer);

    let read = LogRecords::read(&path).unwrap();
    assert_eq!(read.steps, steps);
    assert_eq!(read.evals, vec![eval(0, 3, 0.25)]);
    let e = &read.evals[0];
    assert_eq!(e.task_score("CoLA"), Some(0.25));
    close("glue", e.glue, (0.25 + (8.0 / 11.0 + 0.7) / 2.0) / 2.0);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 7);
    assert!(
        text.lines()
            .nth(3)
            .unwrap()
            .starts_with(r#"{"eval":0,"step":3,"tasks":{"CoLA":{"mcc":0.25,"score":0.25}"#)
    );
}

#[test]
fn log_keeps_nan_losses() {
    let text =
        format!("{}\n", serde_json::to_string(&pals::train::Record::Step(step(0, "RTE", f32::NAN))).unwrap());
    assert!(text.contains(r#""loss":null"#), "{text}");
    let read = LogRecords::parse(&text).unwrap();
    assert!(read.steps[0].loss.is_nan());
}

#[test]
fn log_survives_a_crash_mid_line() {
    let path = scratch("crash").join("log.jsonl");
    let mut writer = LogWriter::create(&path).unwrap();
    writer.step(step(0, "CoLA", 0.7)).unwrap();
    writer.step(step(1, "CoLA", 0.6)).unwrap();
    drop(writer);
    // A crash inside the third write.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(r#"{"step":2,"task":"CoLA","loss":0.5,"#);
    std::fs::write(&path, &text).unwrap();
    assert_eq!(LogRecords::read(&path).unwrap().steps, vec![step(0, "CoLA", 0.7), step(1, "CoLA", 0.6)]);

    // Appending cuts the partial line off first.
    let mut writer = LogWriter::append(&path).unwrap();
    writer.step(step(2, "CoLA", 0.5)).unwrap();
    drop(writer);
    let read = LogRecords::read(&path).unwrap();
    assert_eq!(read.steps.iter().map(|s| s.step).collect::<Vec<_>>(), vec![0, 1, 2]);

    // A complete last line without its newline is still a record.
    let whole = std::fs::read_to_string(&path).unwrap();
    assert_eq!(LogRecords::parse(whole.trim_end()).unwrap().steps.len(), 3);

    // A bad line in the middle is an error that names it.
    let bad = whole.replacen(r#"{"step":1"#, r#"{"stop":1"#, 1);
    let error = LogRecords::parse(&bad).unwrap_err();
    assert!(error.to_string().contains("line 2"), "{error}");
}

#[test]
fn log_resume_drops_what_came_after_the_checkpoint() {
    let path = scratch("resume").join("log.jsonl");
    let mut writer = LogWriter::create(&path).unwrap();
    for s in 0..4 {
        writer.step(step(s, "CoLA", 0.5)).unwrap();
    }
    writer.eval(eval(0, 4, 0.1)).unwrap();
    for s in 4..7 {
        writer.step(step(s, "CoLA", 0.4)).unwrap();
    }
    writer.eval(eval(1, 7, 0.2)).unwrap();
    drop(writer);

    // The checkpoint was taken after 4 steps (with the first evaluation).
    let mut writer = LogWriter::resume(&path, 4).unwrap();
    writer.step(step(4, "CoLA", 0.3)).unwrap();
    drop(writer);
    let read = LogRecords::read(&path).unwrap();
    assert_eq!(read.steps.iter().map(|s| s.step).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert_eq!(read.steps[4].loss, 0.3);
    assert_eq!(read.evals, vec![eval(0, 4, 0.1)]);

    // Resuming a run that never logged starts an empty log.
    let fresh = path.with_file_name("fresh.jsonl");
    drop(LogWriter::resume(&fresh, 0).unwrap());
    assert_eq!(LogRecords::read(&fresh).unwrap(), LogRecords::default());
}

// ---------------------------------------------------------------- plot

/// Checks the tags nest: every opened element is closed, in order.
fn assert_well_formed(svg: &str) {
    assert!(svg.starts_with("<svg"), "starts with {:?}", &svg[..20.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    let mut open: Vec<&str> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name.trim()), "closing {name}");
        } else if !tag.ends_with('/') {
            open.push(tag.split_whitespace().next().unwrap());
        }
        assert_eq!(tag.matches('"').count() % 2, 0, "quotes in <{tag}>");
    }
    assert!(open.is_empty(), "left open: {open:?}");
    for bad in ["NaN", "inf"] {
        assert!(!svg.contains(bad), "{bad} in the SVG");
    }
}

fn count(svg: &str, needle: &str) -> usize {
    svg.matches(needle).count()
}

#[test]
fn plot_of_a_real_looking_log() {
    let mut records = LogRecords::default();
    let tasks = ["CoLA", "MRPC", "STS-B"];
    for s in 0..600u32 {
        let loss = if s == 7 {
            f32::NAN
        } else {
            1.0 / (1.0 + s as f32 / 100.0) + 0.1 * ((s * 7919) % 13) as f32 / 13.0
        };
        records.steps.push(step(s, tasks[(s % 3) as usize], loss));
    }
    for e in 0..3 {
        records.evals.push(eval(e, 200 * (e + 1), 0.1 * f64::from(e)));
    }
    let svg = render_svg(&records);
    assert_well_formed(&svg);
    // Loss: a raw <path> and an average <polyline> per task; dev: CoLA, MRPC and GLUE.
    for task in tasks {
        assert_eq!(count(&svg, &format!(r#"<path data-series="{task} raw""#)), 1, "{task}");
    }
    assert_eq!(count(&svg, r#"<polyline data-series="CoLA""#), 2);
    assert_eq!(count(&svg, r#"<polyline data-series="MRPC""#), 2);
    assert_eq!(count(&svg, r#"<polyline data-series="STS-B""#), 1);
    assert_eq!(count(&svg, r#"<polyline data-series="GLUE""#), 1);
    assert!(svg.contains("GLUE average") && svg.contains("Training loss"));

    let dir = scratch("plot");
    let path = dir.join("metrics.svg");
    write_svg(&path, &records).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), svg);
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("metrics.svg")], "no temporary file left");
}

#[test]
fn plot_of_a_long_run_stays_small() {
    // The paper's run: 25 epochs of 2,400 steps over eight tasks, noisy losses.
    let tasks = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE"];
    let mut records = LogRecords::default();
    let mut state = 12345u32;
    for s in 0..60_000u32 {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let noise = (state >> 8) as f32 / (1u32 << 24) as f32;
        let t = (s as usize * 5 + (state >> 28) as usize) % tasks.len();
        let loss = (0.2 + 0.1 * t as f32) * (1.0 + 2.0 * (-(s as f32) / 8000.0).exp()) * (0.5 + noise);
        records.steps.push(step(s, tasks[t], loss));
    }
    for e in 0..25u32 {
        let progress = 1.0 - (-f64::from(e) / 6.0).exp();
        let scores: Vec<TaskScore> =
            ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE"]
                .iter()
                .enumerate()
                .map(|(i, task)| {
                    let v = (0.3 + 0.05 * i as f64) * progress + 0.3;
                    TaskScore { task: task.to_string(), metrics: vec![("acc".into(), v)], score: v }
                })
                .collect();
        records.evals.push(EvalRecord::new(e, 2400 * (e + 1), &scores));
    }
    let svg = render_svg(&records);
    assert_well_formed(&svg);
    assert!(svg.len() < 2_000_000, "{} bytes", svg.len());
    write_svg(&scratch("long-plot").join("metrics.svg"), &records).unwrap();
}

#[test]
fn plot_of_degenerate_logs_has_finite_coordinates() {
    // Empty.
    let empty = render_svg(&LogRecords::default());
    assert_well_formed(&empty);
    assert!(empty.contains("no data"));

    // One step, one evaluation.
    let one = LogRecords { steps: vec![step(0, "RTE", 0.69)], evals: vec![eval(0, 0, 0.0)] };
    let svg = render_svg(&one);
    assert_well_formed(&svg);
    assert_eq!(count(&svg, r#"<path data-series="RTE raw""#), 1);

    // Constant losses and scores, zero everywhere, and only NaN losses.
    let mut constant = LogRecords::default();
    for s in 0..50 {
        constant.steps.push(step(s, "SST-2", 0.0));
        constant.steps.push(step(s, "QNLI", f32::NAN));
    }
    let mut flat = BTreeMap::new();
    flat.insert("SST-2".to_string(), BTreeMap::from([("acc".to_string(), 0.5), ("score".to_string(), 0.5)]));
    for e in 0..3 {
        constant.evals.push(EvalRecord { eval: e, step: 10 * e, tasks: flat.clone(), glue: 0.5 });
    }
    let svg = render_svg(&constant);
    assert_well_formed(&svg);
    assert!(!svg.contains(r#"data-series="QNLI raw""#), "a task with only NaN losses has no points");
}

#[test]
fn plot_escapes_task_names() {
    let records = LogRecords { steps: vec![step(0, "a<b&\"c\"", 1.0)], evals: vec![] };
    let svg = render_svg(&records);
    assert_well_formed(&svg);
    assert!(svg.contains("a&lt;b&amp;&quot;c&quot;"));
}
