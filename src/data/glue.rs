//! GLUE's TSV files: which file holds a task's split, which columns hold the texts and the
//! label, and a strict reader.
//!
//! Files are split on tabs only: quotes are literal text, as in GLUE's own readers (MRPC and
//! SST-2 contain unbalanced `"`). Every bad row is an error naming the file and its 1-based
//! line, except QQP's rows with too few columns, which GLUE's readers skip: those are counted
//! in [`SplitData::skipped`].

use std::fmt;
use std::path::{Path, PathBuf};

use super::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("split '{split}' of {task} not found at {path}")]
    Missing { task: Task, split: Split, path: PathBuf },
    #[error("{task} has no {split} split (it has: {})", names(task.splits()))]
    NoSuchSplit { task: Task, split: Split },
    // The cause is in the message, not chained as a source: printed once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Row { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: {error}")]
    Tokenize { path: PathBuf, line: usize, error: TokenizerError },
    #[error("unknown {what} '{name}' (known: {known})")]
    UnknownName { what: &'static str, name: String, known: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// A GLUE task; `AX` is the diagnostic set (test only, scored with MNLI's labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    CoLA,
    SST2,
    MRPC,
    STSB,
    QQP,
    MNLI,
    QNLI,
    RTE,
    WNLI,
    AX,
}

const BINARY: &[&str] = &["0", "1"];
const NLI3: &[&str] = &["contradiction", "entailment", "neutral"];
const NLI2: &[&str] = &["entailment", "not_entailment"];

impl Task {
    pub const ALL: [Task; 10] = [
        Task::CoLA,
        Task::SST2,
        Task::MRPC,
        Task::STSB,
        Task::QQP,
        Task::MNLI,
        Task::QNLI,
        Task::RTE,
        Task::WNLI,
        Task::AX,
    ];

    /// GLUE's name, also the folder name (AX lives in `diagnostic/`).
    pub fn name(self) -> &'static str {
        match self {
            Task::CoLA => "CoLA",
            Task::SST2 => "SST-2",
            Task::MRPC => "MRPC",
            Task::STSB => "STS-B",
            Task::QQP => "QQP",
            Task::MNLI => "MNLI",
            Task::QNLI => "QNLI",
            Task::RTE => "RTE",
            Task::WNLI => "WNLI",
            Task::AX => "AX",
        }
    }

    /// Case-insensitive, `-` and `_` ignored: "sst2", "STS-B", "ax" or "diagnostic". MNLI's
    /// mismatched sets are splits of MNLI ([`Split::DevMismatched`]), not a task.
    pub fn from_name(name: &str) -> Result<Task> {
        let key = normalize(name);
        if key == "diagnostic" {
            return Ok(Task::AX);
        }
        Task::ALL.into_iter().find(|t| normalize(t.name()) == key).ok_or_else(|| DataError::UnknownName {
            what: "task",
            name: name.to_string(),
            known: names(&Task::ALL),
        })
    }

    fn dir(self) -> &'static str {
        if self == Task::AX { "diagnostic" } else { self.name() }
    }

    /// The splits GLUE distributes for this task.
    pub fn splits(self) -> &'static [Split] {
        match self {
            Task::MNLI => {
                &[Split::Train, Split::Dev, Split::DevMismatched, Split::Test, Split::TestMismatched]
            }
            Task::AX => &[Split::Test],
            _ => &[Split::Train, Split::Dev, Split::Test],
        }
    }

    pub fn is_regression(self) -> bool {
        self == Task::STSB
    }

    /// Outputs of the task's head: 3 for MNLI (and AX), 1 for STS-B's score, 2 otherwise.
    pub fn num_labels(self) -> usize {
        if self.is_regression() { 1 } else { self.labels().len() }
    }

    /// The label strings of the files, class i is `labels()[i]`; empty for STS-B.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Task::MNLI | Task::AX => NLI3,
            Task::QNLI | Task::RTE => NLI2,
            Task::STSB => &[],
            _ => BINARY,
        }
    }

    /// What a prediction of class `i` is written as in a GLUE submission.
    pub fn label_name(self, i: u32) -> Option<&'static str> {
        self.labels().get(i as usize).copied()
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    /// MNLI: the matched dev set.
    Dev,
    /// MNLI only.
    DevMismatched,
    /// MNLI: the matched test set.
    Test,
    /// MNLI only.
    TestMismatched,
}

impl Split {
    pub const ALL: [Split; 5] =
        [Split::Train, Split::Dev, Split::DevMismatched, Split::Test, Split::TestMismatched];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::DevMismatched => "dev_mismatched",
            Split::Test => "test",
            Split::TestMismatched => "test_mismatched",
        }
    }

    /// "train", "dev", "dev_mismatched", "test", "test_mismatched"; "dev_matched" and
    /// "test_matched" as MNLI's files call them. Case-insensitive.
    pub fn from_name(name: &str) -> Result<Split> {
        let key = normalize(name);
        let found = match key.as_str() {
            "devmatched" => Some(Split::Dev),
            "testmatched" => Some(Split::Test),
            _ => Split::ALL.into_iter().find(|s| normalize(s.name()) == key),
        };
        found.ok_or_else(|| DataError::UnknownName {
            what: "split",
            name: name.to_string(),
            known: names(&Split::ALL),
        })
    }

    pub fn is_test(self) -> bool {
        matches!(self, Split::Test | Split::TestMismatched)
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn normalize(name: &str) -> String {
    name.chars().filter(|c| !matches!(c, '-' | '_')).collect::<String>().to_lowercase()
}

fn names<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

/// A class index into [`Task::labels`], or STS-B's similarity score (0–5, as in the file).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Label {
    Class(u32),
    Score(f32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// 1-based line in the file, for messages.
    pub line: usize,
    /// The id column of test files, which a GLUE submission is keyed by.
    pub id: Option<String>,
    pub text_a: String,
    pub text_b: Option<String>,
    /// None in test files.
    pub label: Option<Label>,
}

/// The examples of one split, in file order.
#[derive(Clone, Debug)]
pub struct SplitData {
    pub examples: Vec<Example>,
    /// Malformed rows skipped (QQP only; always 0 for the other tasks).
    pub skipped: usize,
}

/// Where `split` of `task` lives under `glue_dir`; an error if GLUE has no such split.
pub fn split_path(glue_dir: &Path, task: Task, split: Split) -> Result<PathBuf> {
    if !task.splits().contains(&split) {
        return Err(DataError::NoSuchSplit { task, split });
    }
    let file = match (task, split) {
        (Task::AX, _) => "diagnostic.tsv",
        (Task::MNLI, Split::Dev) => "dev_matched.tsv",
        (Task::MNLI, Split::DevMismatched) => "dev_mismatched.tsv",
        (Task::MNLI, Split::Test) => "test_matched.tsv",
        (Task::MNLI, Split::TestMismatched) => "test_mismatched.tsv",
        (_, Split::Train) => "train.tsv",
        (_, Split::Dev) => "dev.tsv",
        _ => "test.tsv",
    };
    Ok(glue_dir.join(task.dir()).join(file))
}

/// The raw bytes of a split's file; a missing file is [`DataError::Missing`].
pub(crate) fn read_split_bytes(glue_dir: &Path, task: Task, split: Split) -> Result<(PathBuf, Vec<u8>)> {
    let path = split_path(glue_dir, task, split)?;
    match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataError::Missing { task, split, path }),
        Err(error) => Err(DataError::Io { path, error }),
    }
}

/// Reads and checks every row of `split` of `task` under `glue_dir` (GLUE's layout).
pub fn read_split(glue_dir: &Path, task: Task, split: Split) -> Result<SplitData> {
    let (path, bytes) = read_split_bytes(glue_dir, task, split)?;
    parse_split(&bytes, &path, task, split)
}

/// Where the fields of a row are (0-based columns).
struct Columns {
    header: bool,
    id: Option<usize>,
    text_a: usize,
    text_b: Option<usize>,
    label: LabelColumn,
}

impl Columns {
    /// How many columns a row must have; a `Last` label must come after the texts.
    fn needed(&self) -> usize {
        let texts = self.text_a.max(self.text_b.unwrap_or(0)) + 1;
        let label = match self.label {
            LabelColumn::None => 0,
            LabelColumn::At(c) => c + 1,
            LabelColumn::Last => texts + 1,
        };
        texts.max(label).max(self.id.map_or(0, |c| c + 1))
    }
}

enum LabelColumn {
    None,
    At(usize),
    /// The last column, after the texts (MNLI's dev files have more annotator columns).
    Last,
}

/// bert-pals.md's table; test files start with an id and have no label.
fn columns(task: Task, split: Split) -> Columns {
    use LabelColumn::{At, Last};
    let test = split.is_test();
    let (text_a, text_b, label) = match task {
        Task::CoLA if test => (1, None, LabelColumn::None),
        Task::CoLA => (3, None, At(1)),
        Task::SST2 if test => (1, None, LabelColumn::None),
        Task::SST2 => (0, None, At(1)),
        Task::MRPC => (3, Some(4), At(0)),
        Task::STSB => (7, Some(8), Last),
        Task::QQP if test => (1, Some(2), LabelColumn::None),
        Task::QQP => (3, Some(4), At(5)),
        Task::MNLI => (8, Some(9), Last),
        Task::QNLI | Task::RTE | Task::WNLI | Task::AX => (1, Some(2), Last),
    };
    Columns {
        // Only CoLA's train and dev files lack a header line.
        header: test || task != Task::CoLA,
        id: test.then_some(0),
        text_a,
        text_b,
        label: if test { LabelColumn::None } else { label },
    }
}

pub(crate) fn parse_split(bytes: &[u8], path: &Path, task: Task, split: Split) -> Result<SplitData> {
    let row_error = |line: usize, message: String| DataError::Row { path: path.to_path_buf(), line, message };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        row_error(line, "not valid UTF-8".to_string())
    })?;
    // MRPC's files start with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let cols = columns(task, split);
    let needed = cols.needed();
    let mut data = SplitData { examples: Vec::new(), skipped: 0 };
    for (i, row) in text.lines().enumerate().skip(cols.header as usize) {
        let line = i + 1;
        let fields: Vec<&str> = row.split('\t').collect();
        if fields.len() < needed {
            if task == Task::QQP {
                data.skipped += 1;
                continue;
            }
            return Err(row_error(
                line,
                format!("{} columns, {task} {split} rows need {needed}", fields.len()),
            ));
        }
        let label_text = match cols.label {
            LabelColumn::None => None,
            LabelColumn::At(c) => Some(fields[c]),
            LabelColumn::Last => Some(fields[fields.len() - 1]),
        };
        let label = label_text.map(|t| parse_label(task, t)).transpose().map_err(|m| row_error(line, m))?;
        data.examples.push(Example {
            line,
            id: cols.id.map(|c| fields[c].to_string()),
            text_a: fields[cols.text_a].to_string(),
            text_b: cols.text_b.map(|c| fields[c].to_string()),
            label,
        });
    }
    Ok(data)
}

fn parse_label(task: Task, text: &str) -> std::result::Result<Label, String> {
    let text = text.trim();
    if task.is_regression() {
        return match text.parse::<f32>() {
            Ok(score) if (0.0..=5.0).contains(&score) => Ok(Label::Score(score)),
            Ok(score) => Err(format!("score {score} is outside 0–5")),
            Err(_) => Err(format!("unparsable score {text:?}")),
        };
    }
    let labels = task.labels();
    match labels.iter().position(|&l| l == text) {
        Some(i) => Ok(Label::Class(i as u32)),
        None => Err(format!("unknown label {text:?} ({task} labels: {})", labels.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_table_matches_bert_pals() {
        let c = columns(Task::MRPC, Split::Train);
        assert!(c.header && c.id.is_none());
        assert_eq!((c.text_a, c.text_b), (3, Some(4)));
        assert!(matches!(c.label, LabelColumn::At(0)));
        let c = columns(Task::STSB, Split::Dev);
        assert_eq!((c.text_a, c.text_b), (7, Some(8)));
        assert!(matches!(c.label, LabelColumn::Last));
        let c = columns(Task::MNLI, Split::TestMismatched);
        assert_eq!((c.id, c.text_a, c.text_b), (Some(0), 8, Some(9)));
        assert!(matches!(c.label, LabelColumn::None));
        let c = columns(Task::CoLA, Split::Train);
        assert!(!c.header);
        let c = columns(Task::CoLA, Split::Test);
        assert!(c.header && c.text_a == 1 && c.text_b.is_none());
        let c = columns(Task::QQP, Split::Test);
        assert_eq!((c.id, c.text_a, c.text_b), (Some(0), 1, Some(2)));
        let c = columns(Task::AX, Split::Test);
        assert_eq!((c.id, c.text_a, c.text_b), (Some(0), 1, Some(2)));
    }
}
