//! A task wherever its data comes from: a GLUE task in GLUE's folder layout, or a custom task's
//! own folder (data/custom.rs). Training, eval, predict and serve ask this, never which kind
//! of task it is: its name, outputs, label strings, dev sets and tokenized splits.

use std::path::Path;

use super::Tokenizer;
use super::cache::{TokenizedSplit, tokenized_custom_split, tokenized_split};
use super::custom::{CustomTask, Kind};
use super::glue::{DataError, Result, Split, Task};

#[derive(Clone, Debug, PartialEq)]
pub enum TaskSource {
    Glue(Task),
    Custom(CustomTask),
}

impl TaskSource {
    pub fn name(&self) -> &str {
        match self {
            TaskSource::Glue(task) => task.name(),
            TaskSource::Custom(task) => &task.name,
        }
    }

    /// Outputs of the task's head: one score, or one logit per class.
    pub fn num_labels(&self) -> usize {
        match self {
            TaskSource::Glue(task) => task.num_labels(),
            TaskSource::Custom(task) => task.num_labels(),
        }
    }

    pub fn is_regression(&self) -> bool {
        self.num_labels() == 1
    }

    /// Whether this task's classification is scored by accuracy and macro-F1 (custom tasks)
    /// rather than GLUE's metric for the task.
    pub fn is_custom_classification(&self) -> bool {
        matches!(self, TaskSource::Custom(t) if t.kind == Kind::Classification)
    }

    /// What a prediction of class `i` is written as: GLUE's label, or the train file's.
    pub fn label_name(&self, i: u32) -> Option<&str> {
        match self {
            TaskSource::Glue(task) => task.label_name(i),
            TaskSource::Custom(task) => task.label_name(i),
        }
    }

    /// Every class's label string, class i first; empty for regression.
    pub fn labels(&self) -> Vec<String> {
        (0..self.num_labels() as u32).map_while(|i| self.label_name(i).map(str::to_string)).collect()
    }

    /// A predicted score as written: STS-B's clamped to its 0–5 scale; a custom task's as
    /// the model gives it (its scale is the user's, unknown to us).
    pub fn clamp_score(&self, score: f32) -> f32 {
        match self {
            TaskSource::Glue(_) => score.clamp(0.0, 5.0),
            TaskSource::Custom(_) => score,
        }
    }

    /// The dev sets a task is scored on, (score name, split): MNLI's matched and mismatched
    /// ones, the one `dev` file else.
    pub fn dev_splits(&self) -> Vec<(String, Split)> {
        match self {
            TaskSource::Glue(Task::MNLI) => {
                vec![("MNLI-m".into(), Split::Dev), ("MNLI-mm".into(), Split::DevMismatched)]
            }
            _ => vec![(self.name().to_string(), Split::Dev)],
        }
    }

    /// `split` of this task tokenized to at most `max_len` tokens, through the cache in
    /// `cache_dir`. GLUE tasks are read from `glue_dir`, which they need.
    pub fn tokenized(
        &self,
        tokenizer: &Tokenizer,
        glue_dir: Option<&Path>,
        split: Split,
        max_len: usize,
        cache_dir: Option<&Path>,
    ) -> Result<TokenizedSplit> {
        match self {
            TaskSource::Glue(task) => {
                let glue_dir = glue_dir.ok_or_else(|| {
                    DataError::Invalid(format!("{task} is a GLUE task: give --glue-dir (or PALS_GLUE_DIR)"))
                })?;
                tokenized_split(tokenizer, glue_dir, *task, split, max_len, cache_dir)
            }
            TaskSource::Custom(task) => tokenized_custom_split(tokenizer, task, split, max_len, cache_dir),
        }
    }

    /// The file `split` is read from, for messages.
    pub fn split_path(&self, glue_dir: Option<&Path>, split: Split) -> String {
        let path = match (self, glue_dir) {
            (TaskSource::Glue(task), Some(dir)) => super::glue::split_path(dir, *task, split).ok(),
            (TaskSource::Custom(task), _) => task.file_path(split).ok(),
            _ => None,
        };
        path.map_or_else(|| format!("{} {split}", self.name()), |p| p.display().to_string())
    }
}

/// Case, '-' and '_' ignored: how GLUE names are matched, so custom names are compared so too.
fn normalize(name: &str) -> String {
    name.chars().filter(|c| !matches!(c, '-' | '_')).collect::<String>().to_lowercase()
}

/// Refuses a custom task name that is a GLUE task's (or one of its score names: MNLI-m,
/// MNLI-mm, diagnostic) or another custom task's, as GLUE names are matched: ignoring case,
/// '-' and '_'. Such names would share a checkpoint file, a score line or a cache file.
pub fn check_custom_names<'a>(custom: impl IntoIterator<Item = &'a str>) -> Result<()> {
    let mut seen: Vec<&str> = Vec::new();
    for name in custom {
        let key = normalize(name);
        if Task::from_name(name).is_ok() || ["mnlim", "mnlimm"].contains(&key.as_str()) {
            return Err(DataError::Invalid(format!(
                "--task {name}: the name is a GLUE task's; GLUE tasks go in --tasks, give yours another name"
            )));
        }
        if let Some(other) = seen.iter().find(|n| normalize(n) == key) {
            return Err(DataError::Invalid(format!(
                "--task {name}: another --task is named {other} (names are compared ignoring case, '-' and '_')"
            )));
        }
        seen.push(name);
    }
    Ok(())
}
