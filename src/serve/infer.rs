//! What the server runs on the GPU: a checkpoint loaded for inference, behind [`Infer`], so
//! the batcher and the routes do not depend on how a model is stored or run. The model is
//! `pals predict`'s ([`InferenceModel`]): the same loading, padded batches and head outputs.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::data::batch::{BatchOptions, make_batch};
use crate::data::cache::TokenizedExample;
use crate::data::source::TaskSource;
use crate::data::tokenizer::Encoded;
use crate::encode::Pooling;
use crate::gpu::Gpu;
use crate::model::EncoderBatch;
use crate::model::tasks::{MethodName, REGRESSION_SCALE};
use crate::train::inference::InferenceModel;
use crate::train::rundir::checkpoint_to_read;

/// One task the model answers.
#[derive(Clone, Debug, Serialize)]
pub struct TaskInfo {
    pub name: String,
    /// Class names (GLUE's for GLUE tasks, the train file's for custom ones); empty for a score.
    pub labels: Vec<String>,
    pub regression: bool,
    /// What the task is: how a score is written (STS-B's clamped to 0–5, as by `pals predict`).
    #[serde(skip)]
    pub source: TaskSource,
    /// Which encoder runs the task, named by the first task that runs on it: 0 for every
    /// method but `separate`, where each task has its own.
    #[serde(skip)]
    pub encoder: usize,
}

/// What `GET /v1/tasks` shows, and what the routes check requests against.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub method: String,
    pub tasks: Vec<TaskInfo>,
    /// Inputs are truncated to this many tokens, as in training.
    pub max_length: usize,
    pub hidden_size: usize,
    pub layers: usize,
    /// Encoders on the GPU: 1, or one per task for `separate`.
    pub encoders: usize,
    pub checkpoint: String,
    pub adapter: String,
}

/// A model the batcher can run: one batch of tokenized inputs at a time.
pub trait Infer {
    fn info(&self) -> ModelInfo;
    /// Per input, task `task`'s head outputs: logits, or for a regression task the score
    /// (unclamped; [`Answer::new`] clamps it as `pals predict` does).
    fn predict(&mut self, task: usize, inputs: &[Encoded]) -> Result<Vec<Vec<f32>>>;
    /// Per input, encoder `encoder`'s pooled embedding (no task modules).
    fn encode(&mut self, encoder: usize, inputs: &[Encoded], pooling: Pooling) -> Result<Vec<Vec<f32>>>;
}

/// A task's answer for one input.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Class { label: String, probabilities: serde_json::Map<String, serde_json::Value> },
    Score { score: f32 },
}

impl Answer {
    /// The label `pals predict` writes (argmax, first on ties; STS-B scores clamped to
    /// [0, 5]) with the class probabilities (softmax of the logits).
    pub fn new(task: &TaskInfo, outputs: &[f32]) -> Answer {
        if task.regression {
            return Answer::Score { score: task.source.clamp_score(outputs[0]) };
        }
        let mut best = 0;
        for (i, &v) in outputs.iter().enumerate() {
            if v > outputs[best] {
                best = i;
            }
        }
        let top = outputs[best] as f64;
        let exps: Vec<f64> = outputs.iter().map(|&v| (v as f64 - top).exp()).collect();
        let total: f64 = exps.iter().sum();
        let probabilities =
            task.labels.iter().zip(&exps).map(|(l, e)| (l.clone(), (e / total).into())).collect();
        Answer::Class { label: task.labels[best].clone(), probabilities }
    }
}

/// A `pals train` checkpoint on the GPU, as `pals predict` loads it ([`InferenceModel`]).
pub struct CheckpointModel<'g> {
    model: InferenceModel<'g>,
    info: ModelInfo,
    max_batch: usize,
}

impl<'g> CheckpointModel<'g> {
    /// Uploads the checkpoint in `dir` (an output directory serves its `best/`, as
    /// `pals predict` does). Batches run at most `max_batch` inputs at once.
    pub fn load(gpu: &'g Gpu, dir: &Path, max_batch: usize) -> Result<CheckpointModel<'g>> {
        let dir = checkpoint_to_read(dir)?;
        let model = InferenceModel::load(gpu, &dir)?;
        let separate = model.settings.method == MethodName::Separate;
        let mut tasks = Vec::new();
        for (i, source) in model.sources().iter().enumerate() {
            let encoder = if separate { i } else { 0 };
            tasks.push(TaskInfo {
                name: source.name().to_string(),
                labels: source.labels(),
                regression: source.is_regression(),
                source: source.clone(),
                encoder,
            });
        }
        let info = ModelInfo {
            method: model.settings.method.to_string(),
            encoders: if separate { tasks.len() } else { 1 },
            tasks,
            max_length: model.settings.max_length,
            hidden_size: model.config.hidden_size,
            layers: model.config.num_hidden_layers,
            checkpoint: dir.display().to_string(),
            adapter: gpu.describe(),
        };
        Ok(CheckpointModel { model, info, max_batch: max_batch.max(1) })
    }

    /// The padded batch of `inputs` exactly as `pals predict` pads (pad id 0, filler rows),
    /// but with batch and sequence sizes rounded up to powers of two, so that a few
    /// buffer sets serve all traffic.
    fn batch(&self, inputs: &[Encoded]) -> EncoderBatch {
        let examples: Vec<TokenizedExample> = inputs
            .iter()
            .enumerate()
            .map(|(index, e)| TokenizedExample {
                ids: e.ids.clone(),
                type_ids: e.type_ids.clone(),
                label: None,
                index,
            })
            .collect();
        let longest = inputs.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
        let longest_allowed = self.info.max_length.next_multiple_of(8).max(longest);
        let seq = longest.next_power_of_two().max(8).min(longest_allowed);
        let batch_size = inputs.len().next_power_of_two().min(self.max_batch).max(inputs.len());
        let options = BatchOptions { batch_size, pad_to_batch: true, seq_multiple: seq, pad_id: 0 };
        let rows: Vec<usize> = (0..inputs.len()).collect();
        make_batch(&examples, &rows, &options).encoder
    }
}

impl Infer for CheckpointModel<'_> {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn predict(&mut self, task: usize, inputs: &[Encoded]) -> Result<Vec<Vec<f32>>> {
        let regression = self.info.tasks[task].regression;
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.max_batch) {
            let batch = self.batch(chunk);
            let logits = self.model.logits(task, &batch)?;
            for row in logits.chunks(logits.len() / batch.batch).take(chunk.len()) {
                // Regression heads predict score / 5, as in `predict_split`.
                out.push(if regression { vec![row[0] * REGRESSION_SCALE] } else { row.to_vec() });
            }
        }
        Ok(out)
    }

    fn encode(&mut self, encoder: usize, inputs: &[Encoded], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.max_batch) {
            let batch = self.batch(chunk);
            let embeddings = self.model.embeddings(encoder, &batch, pooling)?;
            out.extend(embeddings.into_iter().take(chunk.len()));
        }
        Ok(out)
    }
}
