//! What the server runs on the GPU: a checkpoint loaded for inference, behind [`Infer`], so
//! the batcher and the routes do not depend on how a model is stored or run. Loading and the
//! forward follow `pals predict` (`Trainer::predict`): the same checkpoint reading, the same
//! padded batches, the same head outputs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::data::batch::{BatchOptions, make_batch};
use crate::data::cache::TokenizedExample;
use crate::data::glue::Task;
use crate::data::tokenizer::Encoded;
use crate::encode::{Pooling, read_embeddings};
use crate::gpu::{AdapterChoice, Gpu};
use crate::model::bert::BatchInputs;
use crate::model::tasks::{MultiTaskModel, REGRESSION_SCALE, TaskActivations, TaskSpec, task_prefix};
use crate::model::{EncoderBatch, Weights};
use crate::train::checkpoint::{Checkpoint, resolve};
use crate::train::trainer::TrainSettings;

/// One task the model answers.
#[derive(Clone, Debug, Serialize)]
pub struct TaskInfo {
    pub name: String,
    /// Class names (GLUE's for GLUE tasks, "0", "1", … for others); empty for a score.
    pub labels: Vec<String>,
    pub regression: bool,
    /// Which encoder runs the task: 0 for every method but `separate`.
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
    /// The label `pals predict` writes (argmax, first on ties; scores clamped to [0, 5]) with
    /// the class probabilities (softmax of the logits).
    pub fn new(task: &TaskInfo, outputs: &[f32]) -> Answer {
        if task.regression {
            return Answer::Score { score: outputs[0].clamp(0.0, 5.0) };
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

/// Buffers of one (encoder, batch, seq) shape; at most [`MAX_BUCKETS`] are kept.
struct Bucket {
    acts: TaskActivations,
    inputs: BatchInputs,
    last_used: u64,
}

/// Shapes whose buffers are kept: batch and sequence sizes are rounded up to powers of two,
/// so a few shapes serve all traffic, and the least recently used is dropped beyond this.
const MAX_BUCKETS: usize = 8;

/// A `pals train` checkpoint on the GPU.
pub struct CheckpointModel {
    gpu: Gpu,
    /// One model, or one per task for `separate`.
    models: Vec<MultiTaskModel>,
    /// Task i is models[tasks[i].encoder]'s task place[i].
    place: Vec<usize>,
    info: ModelInfo,
    max_batch: usize,
    buckets: HashMap<(usize, usize, usize), Bucket>,
    uses: u64,
}

impl CheckpointModel {
    /// Opens the adapter and uploads the checkpoint in `dir` (an output directory serves its
    /// `best/`, as `pals predict` does). Batches run at most `max_batch` inputs at once.
    pub fn load(adapter: &AdapterChoice, dir: &Path, max_batch: usize) -> Result<CheckpointModel> {
        let dir = resolve(dir);
        let checkpoint = Checkpoint::load(&dir, false)?;
        let settings: TrainSettings =
            serde_json::from_value(checkpoint.run.clone()).context("reading the checkpoint's run.json")?;
        let gpu = Gpu::new(adapter)?;
        let config = &checkpoint.config;
        let method = settings.method(config)?;
        let separate = settings.method == "separate";
        let mut tasks = Vec::new();
        let mut weights = Vec::new();
        for name in &settings.tasks {
            let (info, task_weights) = task_info(&checkpoint, name, &dir)?;
            tasks.push(TaskInfo { encoder: if separate { tasks.len() } else { 0 }, ..info });
            weights.push(task_weights);
        }
        let spec = |t: &TaskInfo| TaskSpec::new(&t.name, t.labels.len().max(1));
        let mut models = Vec::new();
        if separate {
            // A separate task's file holds its own encoder, as the trainer saves it.
            for (task, w) in tasks.iter().zip(&weights) {
                let encoder = if w.contains_key("pooler.dense.weight") { w } else { &checkpoint.shared };
                models.push(MultiTaskModel::upload(&gpu, config, method, encoder, &[(spec(task), w)])?);
            }
        } else {
            let specs: Vec<(TaskSpec, &Weights)> = tasks.iter().map(spec).zip(weights.iter()).collect();
            models.push(MultiTaskModel::upload(&gpu, config, method, &checkpoint.shared, &specs)?);
        }
        let place = tasks.iter().enumerate().map(|(i, _)| if separate { 0 } else { i }).collect();
        let info = ModelInfo {
            method: settings.method.clone(),
            tasks,
            max_length: settings.max_length,
            hidden_size: config.hidden_size,
            layers: config.num_hidden_layers,
            encoders: models.len(),
            checkpoint: dir.display().to_string(),
            adapter: gpu.describe(),
        };
        let max_batch = max_batch.max(1);
        Ok(CheckpointModel { gpu, models, place, info, max_batch, buckets: HashMap::new(), uses: 0 })
    }

    /// The padded batch of `inputs` exactly as `pals predict` pads (pad id 0, filler rows),
    /// but with batch and sequence sizes rounded up to powers of two.
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

    /// Uploads `batch` into the buffers of its shape (made on first use); returns their key.
    fn upload(&mut self, encoder: usize, batch: &EncoderBatch) -> Result<(usize, usize, usize)> {
        let key = (encoder, batch.batch, batch.seq);
        self.uses += 1;
        if !self.buckets.contains_key(&key) {
            if self.buckets.len() >= MAX_BUCKETS {
                let oldest = self.buckets.iter().min_by_key(|(_, b)| b.last_used).map(|(k, _)| *k);
                oldest.and_then(|k| self.buckets.remove(&k));
            }
            let model = &self.models[encoder];
            let acts = model.activations(&self.gpu, batch.batch, batch.seq)?;
            let inputs = BatchInputs::new(&self.gpu, &model.bert.config, batch.batch, batch.seq)?;
            self.buckets.insert(key, Bucket { acts, inputs, last_used: 0 });
        }
        let bucket = self.buckets.get_mut(&key).expect("inserted above");
        bucket.last_used = self.uses;
        bucket.inputs.write(&self.gpu, batch)?;
        Ok(key)
    }
}

/// Task `name` of a checkpoint: its canonical name, labels and weights; the number of
/// outputs is read from its head.
fn task_info(checkpoint: &Checkpoint, name: &str, dir: &Path) -> Result<(TaskInfo, Weights)> {
    let glue = Task::from_name(name).ok();
    let canonical = glue.map_or(name.to_string(), |t| t.name().to_string());
    let Some(weights) = checkpoint.tasks.get(&canonical) else {
        bail!("{}: run.json lists task '{name}' but tasks/{canonical}.safetensors is missing", dir.display());
    };
    let head = format!("{}head.bias", task_prefix(&canonical));
    let Some(bias) = weights.get(&head) else {
        bail!("{}: tasks/{canonical}.safetensors has no '{head}'", dir.display());
    };
    let outputs = bias.data.len();
    let labels: Vec<String> = match glue {
        Some(task) if task.num_labels() != outputs => {
            bail!("{}: '{head}' has {outputs} outputs, {canonical} has {}", dir.display(), task.num_labels())
        }
        Some(task) => task.labels().iter().map(|l| l.to_string()).collect(),
        None if outputs == 1 => Vec::new(),
        None => (0..outputs).map(|i| i.to_string()).collect(),
    };
    let info = TaskInfo { name: canonical, regression: outputs == 1, labels, encoder: 0 };
    Ok((info, weights.clone()))
}

impl Infer for CheckpointModel {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn predict(&mut self, task: usize, inputs: &[Encoded]) -> Result<Vec<Vec<f32>>> {
        let (encoder, k) = (self.info.tasks[task].encoder, self.place[task]);
        let regression = self.info.tasks[task].regression;
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.max_batch) {
            let batch = self.batch(chunk);
            let key = self.upload(encoder, &batch)?;
            let (model, gpu, bucket) = (&self.models[encoder], &self.gpu, &self.buckets[&key]);
            let mut rec = gpu.recorder();
            model.forward(&mut rec, &bucket.acts, &bucket.inputs, k, None)?;
            rec.submit()?;
            let logits: Vec<f32> = gpu.read(&model.logits(&bucket.acts, k)?)?;
            let width = logits.len() / batch.batch;
            for row in logits.chunks(width).take(chunk.len()) {
                // Regression heads predict score / 5 (see MultiTaskModel::forward).
                out.push(if regression { vec![row[0] * REGRESSION_SCALE] } else { row.to_vec() });
            }
        }
        Ok(out)
    }

    fn encode(&mut self, encoder: usize, inputs: &[Encoded], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.max_batch) {
            let batch = self.batch(chunk);
            let key = self.upload(encoder, &batch)?;
            let (bert, gpu, bucket) = (&self.models[encoder].bert, &self.gpu, &self.buckets[&key]);
            let mut rec = gpu.recorder();
            bert.forward(&mut rec, &bucket.acts.encoder, &bucket.inputs, None)?;
            rec.submit()?;
            let embeddings = read_embeddings(gpu, &bucket.acts.encoder, &batch, pooling)?;
            out.extend(embeddings.into_iter().take(chunk.len()));
        }
        Ok(out)
    }
}
