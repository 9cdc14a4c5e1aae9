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
use std::path::{Path, PathBuf};

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
    /// Mixed precision: the loss scale the step used, and whether its gradients overflowed
    /// (and so it did not update anything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<bool>,
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
    /// Reads the log at `path`; errors name the file (and a bad line).
    pub fn read(path: &Path) -> io::Result<LogRecords> {
        Ok(LogRecords::read_with_torn(path)?.0)
    }

    /// Reads the log at `path`, and the 1-based number of a torn last line it skipped.
    pub fn read_with_torn(path: &Path) -> io::Result<(LogRecords, Option<usize>)> {
        let text = std::fs::read_to_string(path).map_err(|e| at(path, "reading metrics log", e))?;
        let (records, torn) =
            LogRecords::parse_with_torn(&text).map_err(|e| at(path, "reading metrics log", e))?;
        Ok((records, torn))
    }

    /// Parses log text; a partial last line is ignored.
    pub fn parse(text: &str) -> io::Result<LogRecords> {
        Ok(LogRecords::parse_with_torn(text)?.0)
    }

    fn parse_with_torn(text: &str) -> io::Result<(LogRecords, Option<usize>)> {
        let mut records = LogRecords::default();
        let mut torn = None;
        for line in parse_lines(text) {
            match line.record {
                Ok(Record::Step(s)) => records.steps.push(s),
                Ok(Record::Eval(e)) => records.evals.push(e),
                Err(_) if line.tail => torn = Some(line.number),
                Err(error) => {
                    let message = format!("line {}: {error}", line.number);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, message));
                }
            }
        }
        Ok((records, torn))
    }
}

/// An I/O error that says what was done to which file: "creating metrics log runs/x/metrics.jsonl:
/// Permission denied".
fn at(path: &Path, doing: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{doing} {}: {error}", path.display()))
}

/// The length of `text` up to and including its last newline: the complete lines.
fn complete_len(text: &str) -> usize {
    text.rfind('\n').map_or(0, |i| i + 1)
}

/// A non-empty line of the log.
struct Line<'a> {
    /// 1-based.
    number: usize,
    text: &'a str,
    record: Result<Record, String>,
    /// The text after the last newline: a record if it parses, else the remains of a crash
    /// inside a write (a torn line).
    tail: bool,
}

fn parse_lines(text: &str) -> Vec<Line<'_>> {
    let (body, tail) = text.split_at(complete_len(text));
    let parse = |line: &str| serde_json::from_str(line).map_err(|e: serde_json::Error| e.to_string());
    let mut out: Vec<Line> = body
        .lines()
        .enumerate()
        .filter(|(_, text)| !text.trim().is_empty())
        .map(|(i, text)| Line { number: i + 1, text, record: parse(text), tail: false })
        .collect();
    if !tail.trim().is_empty() {
        out.push(Line { number: body.lines().count() + 1, text: tail, record: parse(tail), tail: true });
    }
    out
}

/// Appends records to a log, one flushed line each.
pub struct LogWriter {
    file: File,
    path: PathBuf,
}

impl LogWriter {
    /// A new, empty log at `path` (an existing one is replaced).
    pub fn create(path: &Path) -> io::Result<LogWriter> {
        let file = File::create(path).map_err(|e| at(path, "creating metrics log", e))?;
        Ok(LogWriter { file, path: path.to_path_buf() })
    }

    /// Appends to the log at `path` (created if missing), first cutting off a partial last
    /// line left by a crash so the next record starts on a line of its own.
    pub fn append(path: &Path) -> io::Result<LogWriter> {
        let opened = OpenOptions::new().read(true).append(true).create(true).open(path);
        let file = opened.map_err(|e| at(path, "opening metrics log", e))?;
        let text = std::fs::read(path).map_err(|e| at(path, "reading metrics log", e))?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64).map_err(|e| at(path, "cutting a torn line off metrics log", e))?;
        }
        Ok(LogWriter { file, path: path.to_path_buf() })
    }

    /// Continues the log of a run resumed from a checkpoint taken after `steps_done` steps:
    /// drops what the interrupted run logged after that checkpoint (step lines from
    /// `steps_done` on, evaluations after it), rewriting the file atomically, then appends.
    /// Lines that are not records (torn by a crash) are moved to `<log>.torn`, and said so.
    pub fn resume(path: &Path, steps_done: u32) -> io::Result<LogWriter> {
        let text = match std::fs::read_to_string(path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
            other => other.map_err(|e| at(path, "reading metrics log", e))?,
        };
        let (mut kept, mut torn) = (String::new(), String::new());
        let mut torn_lines = Vec::new();
        for line in parse_lines(&text) {
            match &line.record {
                Ok(record) if record.before(steps_done) => kept.push_str(line.text),
                Ok(_) => continue,
                Err(_) => {
                    torn.push_str(line.text);
                    torn_lines.push(line.number.to_string());
                }
            }
            let target = if line.record.is_ok() { &mut kept } else { &mut torn };
            target.push('\n');
        }
        if !torn_lines.is_empty() {
            let aside = path.with_extension("jsonl.torn");
            append_to(&aside, torn.as_bytes()).map_err(|e| at(&aside, "writing", e))?;
            eprintln!(
                "note: {} line(s) {} were torn (not records); moved to {}",
                path.display(),
                torn_lines.join(", "),
                aside.display()
            );
        }
        write_atomic(path, kept.as_bytes()).map_err(|e| at(path, "rewriting metrics log", e))?;
        LogWriter::append(path)
    }

    /// Writes one record as one line.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
        line.push('\n');
        let written = self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush());
        written.map_err(|e| at(&self.path, "writing metrics log", e))
    }

    /// Writes a step line.
    pub fn step(&mut self, record: StepRecord) -> io::Result<()> {
        self.write(&Record::Step(record))
    }

    /// Writes an eval line and syncs the file to disk: evaluations are rare and precious.
    pub fn eval(&mut self, record: EvalRecord) -> io::Result<()> {
        self.write(&Record::Eval(record))?;
        self.file.sync_data().map_err(|e| at(&self.path, "syncing metrics log", e))
    }
}

fn append_to(path: &Path, bytes: &[u8]) -> io::Result<()> {
    OpenOptions::new().append(true).create(true).open(path)?.write_all(bytes)
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
