//! The official GLUE metrics, computed over the whole dev set (corpus level). The original
//! PALs code averaged CoLA's MCC and STS-B's correlations over batches of 8, which is not the
//! GLUE metric; we never do that.
//!
//! | task | metrics | task score |
//! |---|---|---|
//! | CoLA | Matthews correlation `mcc` | mcc |
//! | MRPC, QQP | `f1` of class 1, `acc` | (f1 + acc) / 2 |
//! | STS-B | `pearson`, `spearman` | (pearson + spearman) / 2 |
//! | SST-2, MNLI-m, MNLI-mm, QNLI, RTE, WNLI, others | `acc` | acc |
//! | custom classification (`--task`) | `acc`, `macro_f1` | acc |
//! | custom regression (`--task`) | `pearson`, `spearman` | (pearson + spearman) / 2 |
//!
//! MNLI's matched and mismatched dev sets are two separate entries, as in GLUE. A custom
//! classification task's score is its accuracy, the metric Hugging Face's run_glue reports
//! for a `--train_file` task; macro-F1 (the unweighted mean of every class's F1) is logged
//! beside it because accuracy hides a model that ignores a rare class.
//!
//! Values are stored as raw fractions: accuracy and F1 in [0, 1], correlations in [-1, 1].
//! GLUE reports them ×100; only `format_table` multiplies. A value that is undefined (a
//! constant prediction, an empty set, a NaN prediction) is 0, never NaN, so one degenerate
//! task cannot poison the average.

use std::fmt::Write;

/// One task's dev metrics and its contribution to the GLUE average.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskScore {
    /// The task name as given, e.g. "MNLI-m".
    pub task: String,
    /// (metric name, value) in GLUE's reporting order: "mcc", "f1", "acc", "pearson", "spearman".
    pub metrics: Vec<(String, f64)>,
    /// The task's score (see the module table): the mean of its metrics, but a custom
    /// classification task's accuracy alone.
    pub score: f64,
}

impl TaskScore {
    /// The value of metric `name`, if this task has it.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Matthews,
    F1Accuracy,
    Correlation,
    Accuracy,
}

/// Task names are matched ignoring case, '-' and '_': "STS-B", "stsb" and "sts_b" agree.
fn kind(task: &str) -> Kind {
    let name: String = task.chars().filter(|c| *c != '-' && *c != '_').collect::<String>().to_lowercase();
    match name.as_str() {
        "cola" => Kind::Matthews,
        "mrpc" | "qqp" => Kind::F1Accuracy,
        "stsb" => Kind::Correlation,
        _ => Kind::Accuracy,
    }
}

/// True for the regression task (STS-B), which `score_regression` takes.
pub fn is_regression(task: &str) -> bool {
    kind(task) == Kind::Correlation
}

fn check_lengths(preds: usize, labels: usize) {
    assert_eq!(preds, labels, "metrics: {preds} predictions for {labels} labels");
}

/// 0 in place of an undefined (NaN or infinite) value.
fn defined(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

/// Fraction of predictions equal to their label; 0 for an empty set.
pub fn accuracy(preds: &[u32], labels: &[u32]) -> f64 {
    check_lengths(preds.len(), labels.len());
    let correct = preds.iter().zip(labels).filter(|(p, l)| p == l).count();
    defined(correct as f64 / labels.len() as f64)
}

/// F1 of the positive class 1: 2TP / (2TP + FP + FN); 0 when there is no positive at all.
pub fn f1(preds: &[u32], labels: &[u32]) -> f64 {
    check_lengths(preds.len(), labels.len());
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (&p, &l) in preds.iter().zip(labels) {
        match (p == 1, l == 1) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    defined(2.0 * tp as f64 / (2 * tp + fp + fn_) as f64)
}

/// Macro-F1: the unweighted mean over classes of each class's F1, 2TP / (2TP + FP + FN), over
/// the classes that occur in the labels or the predictions (as sklearn's `average="macro"`);
/// 0 for an empty set.
pub fn macro_f1(preds: &[u32], labels: &[u32]) -> f64 {
    check_lengths(preds.len(), labels.len());
    let classes = preds.iter().chain(labels).map(|&c| c as usize + 1).max().unwrap_or(0);
    let (mut tp, mut fp, mut fn_) = (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    for (&p, &l) in preds.iter().zip(labels) {
        if p == l {
            tp[p as usize] += 1;
        } else {
            fp[p as usize] += 1;
            fn_[l as usize] += 1;
        }
    }
    let f1s: Vec<f64> = (0..classes)
        .filter(|&c| tp[c] + fp[c] + fn_[c] > 0)
        .map(|c| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fn_[c]) as f64)
        .collect();
    defined(f1s.iter().sum::<f64>() / f1s.len() as f64)
}

/// Matthews correlation coefficient, in the multi-class form sklearn uses (equal to the
/// binary (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)) for two classes); 0 when
/// undefined, as when predictions or labels are all one class.
pub fn matthews(preds: &[u32], labels: &[u32]) -> f64 {
    check_lengths(preds.len(), labels.len());
    let classes = preds.iter().chain(labels).map(|&c| c as usize + 1).max().unwrap_or(0);
    let (mut predicted, mut actual) = (vec![0f64; classes], vec![0f64; classes]);
    let mut correct = 0f64;
    for (&p, &l) in preds.iter().zip(labels) {
        predicted[p as usize] += 1.0;
        actual[l as usize] += 1.0;
        correct += f64::from(p == l);
    }
    let n = labels.len() as f64;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let numerator = correct * n - dot(&predicted, &actual);
    let denominator = ((n * n - dot(&predicted, &predicted)) * (n * n - dot(&actual, &actual))).sqrt();
    defined(numerator / denominator)
}

/// Pearson correlation; 0 when undefined (fewer than two values, or one side constant).
pub fn pearson(x: &[f32], y: &[f32]) -> f64 {
    check_lengths(x.len(), y.len());
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let y: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    pearson_f64(&x, &y)
}

fn pearson_f64(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    // A constant side has sxx exactly 0 (every dx is exactly 0), so the quotient is NaN → 0.
    defined(sxy / (sxx * syy).sqrt())
}

/// 1-based ranks, tied values sharing the average of their ranks (as scipy's rankdata).
pub fn average_ranks(x: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean is (start + 1 + end) / 2.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Spearman correlation: Pearson of the average ranks; 0 when undefined.
pub fn spearman(x: &[f32], y: &[f32]) -> f64 {
    check_lengths(x.len(), y.len());
    pearson_f64(&average_ranks(x), &average_ranks(y))
}

fn task_score(task: &str, metrics: Vec<(&str, f64)>) -> TaskScore {
    let score = metrics.iter().map(|&(_, v)| v).sum::<f64>() / metrics.len() as f64;
    let metrics = metrics.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    TaskScore { task: task.to_string(), metrics, score }
}

/// The GLUE metrics of a classification task.
///
/// # Panics
/// On STS-B (use `score_regression`) or when the lengths differ.
pub fn score_classification(task: &str, preds: &[u32], labels: &[u32]) -> TaskScore {
    let metrics = match kind(task) {
        Kind::Matthews => vec![("mcc", matthews(preds, labels))],
        Kind::F1Accuracy => vec![("f1", f1(preds, labels)), ("acc", accuracy(preds, labels))],
        Kind::Accuracy => vec![("acc", accuracy(preds, labels))],
        Kind::Correlation => panic!("{task} is a regression task: use score_regression"),
    };
    task_score(task, metrics)
}

/// The metrics of a custom classification task: accuracy (its score) and macro-F1.
///
/// # Panics
/// When the lengths differ.
pub fn score_accuracy_macro_f1(task: &str, preds: &[u32], labels: &[u32]) -> TaskScore {
    let acc = accuracy(preds, labels);
    let metrics = vec![("acc".to_string(), acc), ("macro_f1".to_string(), macro_f1(preds, labels))];
    TaskScore { task: task.to_string(), metrics, score: acc }
}

/// The metrics of a regression task (STS-B's): Pearson and Spearman. Any task name is
/// accepted, so that tasks outside GLUE (the demo's) are scored the same way.
///
/// # Panics
/// When the lengths differ.
pub fn score_regression(task: &str, preds: &[f32], labels: &[f32]) -> TaskScore {
    task_score(task, vec![("pearson", pearson(preds, labels)), ("spearman", spearman(preds, labels))])
}

/// Labels a trivial baseline can be computed for: class ids (u32) or regression scores (f32).
pub trait BaselineLabel: Copy {
    /// The constant prediction learned from `train`.
    fn constant(train: &[Self]) -> Self;
    /// Scores `preds` against `labels` with the task's metrics.
    fn score(task: &str, preds: &[Self], labels: &[Self]) -> TaskScore;
}

impl BaselineLabel for u32 {
    /// The most frequent class (the smallest id among equals; 0 for an empty set).
    fn constant(train: &[u32]) -> u32 {
        let mut counts = vec![0usize; train.iter().map(|&c| c as usize + 1).max().unwrap_or(1)];
        for &c in train {
            counts[c as usize] += 1;
        }
        let best = counts.iter().max().copied().unwrap_or(0);
        counts.iter().position(|&c| c == best).unwrap_or(0) as u32
    }
    fn score(task: &str, preds: &[u32], labels: &[u32]) -> TaskScore {
        score_classification(task, preds, labels)
    }
}

impl BaselineLabel for f32 {
    /// The mean score (0 for an empty set).
    fn constant(train: &[f32]) -> f32 {
        let sum: f64 = train.iter().map(|&v| f64::from(v)).sum();
        defined(sum / train.len() as f64) as f32
    }
    fn score(task: &str, preds: &[f32], labels: &[f32]) -> TaskScore {
        score_regression(task, preds, labels)
    }
}

/// The dev score of predicting one constant learned from the train labels: the majority
/// class for classification (so CoLA's MCC is 0), the train mean for STS-B (a constant, so
/// both correlations are undefined and reported as 0).
pub fn baseline<L: BaselineLabel>(task: &str, train_labels: &[L], dev_labels: &[L]) -> TaskScore {
    let preds = vec![L::constant(train_labels); dev_labels.len()];
    L::score(task, &preds, dev_labels)
}

/// The GLUE average: the mean of the task scores (MNLI-m and MNLI-mm count as two); 0 for none.
pub fn glue_average(scores: &[TaskScore]) -> f64 {
    defined(scores.iter().map(|s| s.score).sum::<f64>() / scores.len() as f64)
}

/// The average as the BERT and PALs papers print it in their "avg" column: one metric per
/// task (F1 for MRPC and QQP, Spearman for STS-B, else the task score), WNLI left out.
/// The PALs paper's rows are reproduced by this, not by `glue_average`.
pub fn paper_average(scores: &[TaskScore]) -> f64 {
    let primary: Vec<f64> = scores
        .iter()
        .filter(|s| !s.task.eq_ignore_ascii_case("wnli"))
        .map(|s| match kind(&s.task) {
            Kind::F1Accuracy => s.metric("f1").unwrap_or(s.score),
            Kind::Correlation => s.metric("spearman").unwrap_or(s.score),
            _ => s.score,
        })
        .collect();
    defined(primary.iter().sum::<f64>() / primary.len() as f64)
}

/// A plain-text table of the dev metrics per task, ×100 as GLUE reports them, then the
/// GLUE average and the papers' average.
pub fn format_table(scores: &[TaskScore]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<10} {:<32} {:>7}", "task", "metrics (x100)", "score");
    for s in scores {
        let metrics: Vec<String> = s.metrics.iter().map(|(n, v)| format!("{n} {:.2}", 100.0 * v)).collect();
        let _ = writeln!(out, "{:<10} {:<32} {:>7.2}", s.task, metrics.join("  "), 100.0 * s.score);
    }
    let _ = writeln!(out, "{:<43} {:>7.2}", "GLUE average", 100.0 * glue_average(scores));
    let _ = writeln!(
        out,
        "{:<43} {:>7.2}",
        "paper average (F1, Spearman, no WNLI)",
        100.0 * paper_average(scores)
    );
    out
}
