//! Your own tasks beside GLUE's: a folder with `train`, `dev` and optionally `test` files as
//! CSV, TSV or JSON lines (`.csv`, `.tsv`, `.jsonl` or `.json`), with the columns `text` (or
//! `sentence1` and `sentence2`) and `label`, as Hugging Face's run_glue reads `--train_file`.
//!
//! The task kind follows run_glue: labels that are strings or integers make a classification
//! task whose classes are the sorted label values of the train file; other numbers make a
//! regression task. `--task NAME=DIR:classification` (or `:regression`) overrides the guess.
//! Every bad row is an error naming the file and its 1-based line; a dev label never seen in
//! train is an error too (the model has no output for it).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::glue::{DataError, Example, Label, Result, Split, SplitData};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Classification,
    Regression,
}

/// One `--task NAME=DIR[:classification|:regression]` flag.
#[derive(Clone, Debug, PartialEq)]
pub struct CustomArg {
    pub name: String,
    pub dir: PathBuf,
    /// The `:classification` / `:regression` suffix; `None` guesses from the train labels.
    pub kind: Option<Kind>,
}

impl FromStr for CustomArg {
    type Err = DataError;

    fn from_str(flag: &str) -> Result<CustomArg> {
        let bad = |why: &str| DataError::Invalid(format!("--task {flag}: {why} (expected NAME=DIR)"));
        let (name, rest) = flag.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (dir, kind) = match rest.rsplit_once(':') {
            Some((dir, "classification")) => (dir, Some(Kind::Classification)),
            Some((dir, "regression")) => (dir, Some(Kind::Regression)),
            _ => (rest, None),
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) {
            return Err(bad("the name must be letters, digits, '-' or '_'"));
        }
        if dir.is_empty() {
            return Err(bad("no folder"));
        }
        Ok(CustomArg { name: name.to_string(), dir: PathBuf::from(dir), kind })
    }
}

impl CustomArg {
    /// The folder, absolute; an error naming the flag when it is not a folder.
    pub fn existing_dir(&self) -> Result<PathBuf> {
        let flag = format!("--task {}={}", self.name, self.dir.display());
        if !self.dir.is_dir() {
            return Err(DataError::Invalid(format!("{flag}: {} is not a folder", self.dir.display())));
        }
        std::path::absolute(&self.dir).map_err(|error| DataError::Io { path: self.dir.clone(), error })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Classification => "classification",
            Kind::Regression => "regression",
        })
    }
}

/// A custom task as training sees it: its kind and, for classification, its classes (class
/// i is `labels[i]`). A checkpoint keeps all of it (run.json), so that `eval`, `predict` and
/// `serve` know the task without its train file and write the original label strings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustomTask {
    pub name: String,
    pub dir: PathBuf,
    pub kind: Kind,
    pub labels: Vec<String>,
}

impl CustomTask {
    /// Reads the train file to settle the kind and the classes. The folder is kept as an
    /// absolute path, so that a checkpoint finds it from anywhere.
    pub fn from_arg(arg: &CustomArg) -> Result<CustomTask> {
        let dir = arg.existing_dir()?;
        let path = split_file(&dir, Split::Train)?;
        let rows = read_rows(&path)?;
        let kind = arg.kind.unwrap_or_else(|| guess_kind(&rows));
        let mut labels = Vec::new();
        if kind == Kind::Classification {
            for row in &rows {
                let label = row.label.as_ref().ok_or_else(|| row_error(&path, row.line, "no label"))?;
                if label.text.contains(['\t', '\n', '\r']) {
                    let why = "a label with a tab or line break cannot be written in `pals predict`'s TSV";
                    return Err(row_error(&path, row.line, why));
                }
                if !labels.contains(&label.text) {
                    labels.push(label.text.clone());
                }
            }
            sort_labels(&mut labels);
            if labels.len() < 2 {
                return Err(row_error(&path, 1, "a classification task needs at least two labels in train"));
            }
        }
        Ok(CustomTask { name: arg.name.clone(), dir, kind, labels })
    }

    /// Refuses `now` (this task read again, from the data given now) unless it has this
    /// task's kind and classes: a model trained on them has no other outputs. `what` says
    /// where this task comes from, e.g. "the checkpoint runs/x/last".
    pub fn check_same(&self, now: &CustomTask, what: &str) -> Result<()> {
        let train = || split_file(&now.dir, Split::Train).unwrap_or_else(|_| now.dir.clone());
        if now.kind != self.kind {
            return Err(DataError::Invalid(format!(
                "task {}: {what} has it as {}, but {} makes it {}",
                self.name,
                self.kind,
                train().display(),
                now.kind
            )));
        }
        if now.labels != self.labels {
            return Err(DataError::Invalid(format!(
                "task {}: {what} was trained with the labels [{}], but {} has [{}]; a model has no \
                 outputs for other labels: train a new run (--overwrite or another --output)",
                self.name,
                self.labels.join(", "),
                train().display(),
                now.labels.join(", ")
            )));
        }
        Ok(())
    }

    /// Outputs of the task's head: one score, or one logit per class.
    pub fn num_labels(&self) -> usize {
        match self.kind {
            Kind::Regression => 1,
            Kind::Classification => self.labels.len(),
        }
    }

    /// Whether the folder has this split (train and dev must exist; test is optional).
    pub fn has(&self, split: Split) -> bool {
        split_file(&self.dir, split).is_ok()
    }

    /// The split's file: `DIR/SPLIT.{csv,tsv,jsonl,json}`.
    pub fn file_path(&self, split: Split) -> Result<PathBuf> {
        split_file(&self.dir, split)
    }

    /// The split's file and its bytes (what a tokenization cache is keyed by).
    pub fn file(&self, split: Split) -> Result<(PathBuf, Vec<u8>)> {
        if !self.dir.is_dir() {
            return Err(DataError::Invalid(format!(
                "task {}: its folder {} is not there; if the data moved, give --task {}=NEWDIR",
                self.name,
                self.dir.display(),
                self.name
            )));
        }
        let path = split_file(&self.dir, split)?;
        let bytes = read_file(&path)?;
        Ok((path, bytes))
    }

    /// What a split's examples depend on besides the file's bytes, for a cache key: the
    /// file's format, the kind and the classes (an edited train file can renumber them).
    pub fn identity(&self, path: &Path) -> String {
        let format = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        serde_json::json!([format, self.kind, self.labels]).to_string()
    }

    /// Reads and checks every row of a split: labels become class indices or scores; test
    /// rows need no label.
    pub fn read(&self, split: Split) -> Result<SplitData> {
        let (path, bytes) = self.file(split)?;
        self.parse(&bytes, &path, split)
    }

    /// [`CustomTask::read`] of a file's bytes already read.
    pub fn parse(&self, bytes: &[u8], path: &Path, split: Split) -> Result<SplitData> {
        let path = path.to_path_buf();
        let rows = parse_rows(bytes, &path)?;
        let examples = rows
            .into_iter()
            .map(|row| {
                let label = if split.is_test() {
                    None
                } else {
                    let label = row.label.as_ref().ok_or_else(|| row_error(&path, row.line, "no label"))?;
                    Some(self.label(label).map_err(|m| row_error(&path, row.line, &m))?)
                };
                Ok(Example { line: row.line, id: row.id, text_a: row.text_a, text_b: row.text_b, label })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SplitData { examples, skipped: 0 })
    }

    fn label(&self, label: &RawLabel) -> std::result::Result<Label, String> {
        match self.kind {
            Kind::Classification => match self.labels.iter().position(|l| *l == label.text) {
                Some(i) => Ok(Label::Class(i as u32)),
                None => Err(format!(
                    "label {:?} never occurs in train (train labels: {})",
                    label.text,
                    self.labels.join(", ")
                )),
            },
            Kind::Regression => match label.text.trim().parse::<f32>() {
                Ok(score) if score.is_finite() => Ok(Label::Score(score)),
                _ => Err(format!(
                    "label {:?} is not a number, and {} is a regression task",
                    label.text, self.name
                )),
            },
        }
    }

    /// What a prediction of class `i` is written as: the train file's own label.
    pub fn label_name(&self, i: u32) -> Option<&str> {
        self.labels.get(i as usize).map(String::as_str)
    }
}

/// A label as the file has it; `number` when it is a number but not an integer (a float in a
/// JSON line, or text such as "0.5" in CSV/TSV), which makes a task regression.
#[derive(Clone, Debug, PartialEq)]
struct RawLabel {
    text: String,
    number: bool,
}

impl RawLabel {
    fn from_text(text: &str) -> RawLabel {
        let text = text.trim();
        let number = text.parse::<i64>().is_err() && text.parse::<f64>().is_ok_and(f64::is_finite);
        RawLabel { text: text.to_string(), number }
    }
}

/// One row: where it is, its texts, its label and (test files) its id.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    line: usize,
    id: Option<String>,
    text_a: String,
    text_b: Option<String>,
    label: Option<RawLabel>,
}

fn row_error(path: &Path, line: usize, message: &str) -> DataError {
    DataError::Row { path: path.to_path_buf(), line, message: message.to_string() }
}

/// run_glue's rule: any non-integer number makes a regression task.
fn guess_kind(rows: &[Row]) -> Kind {
    let regression = rows.iter().any(|r| r.label.as_ref().is_some_and(|l| l.number));
    if regression { Kind::Regression } else { Kind::Classification }
}

/// Integers in numeric order, anything else in string order (run_glue sorts the label list).
fn sort_labels(labels: &mut [String]) {
    if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
        labels.sort_by_key(|l| l.parse::<i64>().unwrap_or_default());
    } else {
        labels.sort();
    }
}

const EXTENSIONS: [&str; 4] = ["csv", "tsv", "jsonl", "json"];

/// `DIR/SPLIT.{csv,tsv,jsonl,json}`: exactly one of them.
fn split_file(dir: &Path, split: Split) -> Result<PathBuf> {
    let found: Vec<PathBuf> = EXTENSIONS
        .iter()
        .map(|ext| dir.join(format!("{split}.{ext}")))
        .filter(|path| path.is_file())
        .collect();
    match found.len() {
        1 => Ok(found[0].clone()),
        0 => Err(DataError::Invalid(format!(
            "{}: no {split} file ({split}.csv, {split}.tsv, {split}.jsonl or {split}.json)",
            dir.display()
        ))),
        _ => Err(DataError::Invalid(format!(
            "{}: more than one {split} file ({}); keep one",
            dir.display(),
            found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| DataError::Io { path: path.to_path_buf(), error })
}

fn read_rows(path: &Path) -> Result<Vec<Row>> {
    parse_rows(&read_file(path)?, path)
}

/// The rows of a file, by its extension.
fn parse_rows(bytes: &[u8], path: &Path) -> Result<Vec<Row>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        row_error(path, line, "not valid UTF-8")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => table_rows(csv_records(text, path)?, path),
        Some("tsv") => {
            let records = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| (i + 1, l.split('\t').map(str::to_string).collect()))
                .collect();
            table_rows(records, path)
        }
        _ => json_rows(text, path),
    }
}

/// Which field holds what, from a header or a JSON object's keys.
struct Fields {
    text_a: String,
    text_b: Option<String>,
}

fn text_fields(names: &[&str], path: &Path, line: usize) -> Result<Fields> {
    let has = |name: &str| names.contains(&name);
    if has("sentence1") {
        Ok(Fields { text_a: "sentence1".into(), text_b: has("sentence2").then(|| "sentence2".into()) })
    } else if has("text") {
        Ok(Fields { text_a: "text".into(), text_b: None })
    } else {
        Err(row_error(path, line, &format!("no 'text' or 'sentence1' column (found: {})", names.join(", "))))
    }
}

/// CSV/TSV records (line, fields) with a header first.
fn table_rows(records: Vec<(usize, Vec<String>)>, path: &Path) -> Result<Vec<Row>> {
    let mut records = records.into_iter();
    let Some((header_line, header)) = records.next() else {
        return Err(row_error(path, 1, "empty file: a header line (text,label) is needed"));
    };
    let names: Vec<&str> = header.iter().map(|h| h.trim()).collect();
    let fields = text_fields(&names, path, header_line)?;
    let column = |name: &str| names.iter().position(|n| *n == name);
    let text_a = column(&fields.text_a).expect("found in the header");
    let text_b = fields.text_b.as_deref().and_then(column);
    let (label, id) = (column("label"), column("id").or_else(|| column("idx")));
    records
        .map(|(line, values)| {
            if values.len() != names.len() {
                let message = format!("{} fields, the header has {}", values.len(), names.len());
                return Err(row_error(path, line, &message));
            }
            Ok(Row {
                line,
                id: id.map(|c| values[c].clone()),
                text_a: values[text_a].clone(),
                text_b: text_b.map(|c| values[c].clone()),
                label: label.map(|c| RawLabel::from_text(&values[c])),
            })
        })
        .collect()
}

/// RFC 4180: fields separated by commas, quoted with `"` when they hold commas, quotes
/// (doubled) or line breaks. Each record comes with the line it starts on.
fn csv_records(text: &str, path: &Path) -> Result<Vec<(usize, Vec<String>)>> {
    let mut records = Vec::new();
    let (mut fields, mut field) = (Vec::new(), String::new());
    let (mut line, mut start, mut quoted, mut after_quote) = (1, 1, false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' if quoted => (quoted, after_quote) = (false, true),
            '"' if field.is_empty() && !after_quote => quoted = true,
            '"' => {
                return Err(row_error(
                    path,
                    line,
                    "a quote inside an unquoted field (quote the field, double the quote)",
                ));
            }
            '\n' if quoted => {
                field.push('\n');
                line += 1;
            }
            ',' if !quoted => {
                fields.push(std::mem::take(&mut field));
                after_quote = false;
            }
            '\r' if !quoted && chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                let record = std::mem::take(&mut fields);
                if !(record.len() == 1 && record[0].trim().is_empty()) {
                    records.push((start, record));
                }
                line += 1;
                (start, after_quote) = (line, false);
            }
            _ if after_quote => return Err(row_error(path, line, "text after a closing quote")),
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(row_error(path, start, "a quoted field is never closed"));
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push((start, fields));
    }
    Ok(records)
}

/// One JSON object per line; a label may be a string or a number.
fn json_rows(text: &str, path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, source) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line = i + 1;
        let value: serde_json::Value =
            serde_json::from_str(source).map_err(|e| row_error(path, line, &format!("not JSON: {e}")))?;
        let Some(object) = value.as_object() else {
            return Err(row_error(path, line, "not a JSON object"));
        };
        let names: Vec<&str> = object.keys().map(String::as_str).collect();
        let fields = text_fields(&names, path, line)?;
        let text = |name: &str| match object.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => Err(row_error(path, line, &format!("'{name}' is not a string"))),
        };
        let label = match object.get("label") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(RawLabel { text: s.clone(), number: false }),
            Some(serde_json::Value::Number(n)) => {
                Some(RawLabel { text: n.to_string(), number: !n.is_i64() && !n.is_u64() })
            }
            Some(serde_json::Value::Bool(b)) => Some(RawLabel { text: b.to_string(), number: false }),
            Some(other) => {
                return Err(row_error(path, line, &format!("label {other} is not a string or a number")));
            }
        };
        let id = object.get("id").or_else(|| object.get("idx")).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        rows.push(Row {
            line,
            id,
            text_a: text(&fields.text_a)?,
            text_b: fields.text_b.as_deref().map(text).transpose()?,
            label,
        });
    }
    Ok(rows)
}
