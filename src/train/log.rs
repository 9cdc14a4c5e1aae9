//! The metrics log: JSON lines, one per training step and one per evaluation.
//!
//! ```text
//! {"step":0,"task":"CoLA","loss":0.6931,"lr":2e-6,"time":0.41}
//! {"eval":0,"step":2400,"tasks":{"CoLA":{"mcc":0.52,"score":0.52},"MRPC":{"acc":0.85,"f1":0.89,"score":0.87}},"glue":0.69}
//! ```
//!
//! A step line: `step` the 0-based step index, `task` the task trained, `loss` the batch
//! loss (a NaN or infinite loss is written as `null` and read back as NaN), `lr` the learning
//! rate used, `time` seconds since training started. An eval line: `eval` the 0-based
//! evaluation (epoch) index, `step` the steps completed when it ran, `tasks` each task's
//! metrics (raw fractions, see `metrics`) plus its GLUE `score`, `glue` the GLUE average.
//!
//! The writer appends and hands each line to the OS in one write, so a crash of the process
//! keeps every line written before it; eval lines are also synced to disk. A crash inside a
//! write leaves a partial last line without its newline: the reader ignores it and the
//! writer cuts it off before appending.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::{TaskScore, glue_average};
use super::write_atomic;

/// One training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u32,
    pub task: String,
    #[serde(with = "nan_as_null")]
    pub loss: f32,
    pub lr: f32,
    pub time: f64,
}

/// One evaluation on the dev sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub eval: u32,
    pub step: u32,
    /// task → metric name → value, with the task's GLUE score under "score".
    pub tasks: BTreeMap<String, BTreeMap<String, f64>>,
    pub glue: f64,
}

impl EvalRecord {
    /// The record of evaluation `eval` after `step` steps, `glue` the average of `scores`.
    pub fn new(eval: u32, step: u32, scores: &[TaskScore]) -> EvalRecord {
        let tasks = scores
            .iter()
            .map(|s| {
                let mut metrics: BTreeMap<String, f64> = s.metrics.iter().cloned().collect();
                metrics.insert("score".to_string(), s.score);
                (s.task.clone(), metrics)
            })
            .collect();
        EvalRecord { eval, step, tasks, glue: glue_average(scores) }
    }

    /// The GLUE score of `task` in this evaluation.
    pub fn task_score(&self, task: &str) -> Option<f64> {
        self.tasks.get(task)?.get("score").copied()
    }
}

/// One line of the log. Step lines are told from eval lines by their fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Step(StepRecord),
    Eval(EvalRecord),
}

impl Record {
    /// Whether this record belongs to a run that had completed `steps_done` steps: a step
    /// line of an earlier step, or an evaluation run no later than that.
    fn before(&self, steps_done: u32) -> bool {
        match self {
            Record::Step(s) => s.step < steps_done,
            Record::Eval(e) => e.step <= steps_done,
        }
    }
}

/// Everything a log holds, in file order within each kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogRecords {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
}

impl LogRecords {
    /// Reads the log at `path` (an `InvalidData` error names a bad line).
    pub fn read(path: &Path) -> io::Result<LogRecords> {
        LogRecords::parse(&std::fs::read_to_string(path)?)
    }

    /// Parses log text; a partial last line is ignored.
    pub fn parse(text: &str) -> io::Result<LogRecords> {
        let mut records = LogRecords::default();
        for (_, record) in parse_lines(text)? {
            match record {
                Record::Step(s) => records.steps.push(s),
                Record::Eval(e) => records.evals.push(e),
            }
        }
        Ok(records)
    }
}

/// The length of `text` up to and including its last newline: the complete lines.
fn complete_len(text: &str) -> usize {
    text.rfind('\n').map_or(0, |i| i + 1)
}

/// Each non-empty line with its record. A bad complete line is an error; the text after the
/// last newline is a record if it parses, else the remains of a crash and ignored.
fn parse_lines(text: &str) -> io::Result<Vec<(&str, Record)>> {
    let (body, tail) = text.split_at(complete_len(text));
    let mut out = Vec::new();
    for (number, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|error| {
            io::Error::new(io::ErrorKind::InvalidData, format!("metrics log line {}: {error}", number + 1))
        })?;
        out.push((line, record));
    }
    if let Ok(record) = serde_json::from_str(tail) {
        out.push((tail, record));
    }
    Ok(out)
}

/// Appends records to a log, one flushed line each.
pub struct LogWriter {
    file: File,
}

impl LogWriter {
    /// A new, empty log at `path` (an existing one is replaced).
    pub fn create(path: &Path) -> io::Result<LogWriter> {
        Ok(LogWriter { file: File::create(path)? })
    }

    /// Appends to the log at `path` (created if missing), first cutting off a partial last
    /// line left by a crash so the next record starts on a line of its own.
    pub fn append(path: &Path) -> io::Result<LogWriter> {
        let file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
        let text = std::fs::read(path)?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64)?;
        }
        Ok(LogWriter { file })
    }

    /// Continues the log of a run resumed from a checkpoint taken after `steps_done` steps:
    /// drops what the interrupted run logged after that checkpoint (step lines from
    /// `steps_done` on, evaluations after it), rewriting the file atomically, then appends.
    pub fn resume(path: &Path, steps_done: u32) -> io::Result<LogWriter> {
        let text = match std::fs::read_to_string(path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
            other => other?,
        };
        let mut kept = String::new();
        for (line, record) in parse_lines(&text)? {
            if record.before(steps_done) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        write_atomic(path, kept.as_bytes())?;
        LogWriter::append(path)
    }

    /// Writes one record as one line.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }

    /// Writes a step line.
    pub fn step(&mut self, record: StepRecord) -> io::Result<()> {
        self.write(&Record::Step(record))
    }

    /// Writes an eval line and syncs the file to disk: evaluations are rare and precious.
    pub fn eval(&mut self, record: EvalRecord) -> io::Result<()> {
        self.write(&Record::Eval(record))?;
        self.file.sync_data()
    }
}

/// JSON has no NaN: a non-finite f32 is written as `null`, and `null` is read as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f32, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() { serializer.serialize_f32(*value) } else { serializer.serialize_none() }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(deserializer)?.unwrap_or(f32::NAN))
    }
}
