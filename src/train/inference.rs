//! Scoring a trained model without training memory: [`InferenceModel`] uploads a
//! checkpoint's weights with no gradients and no optimizer state, and its buffers hold only
//! what a forward needs (model/bert.rs, model/tasks/). `pals eval`, `pals predict` and the
//! server use it; the trainer's dev evaluation shares `build_models`, `predict_split` and
//! `evaluate_tasks` with it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::data::batch::{BatchOptions, eval_batches, scatter};
use crate::data::cache::TokenizedSplit;
use crate::data::source::TaskSource;
use crate::encode::{Pooling, read_embeddings};
use crate::gpu::Gpu;
use crate::model::bert::BatchInputs;
use crate::model::tasks::{Method, MultiTaskModel, REGRESSION_SCALE, TaskActivations, TaskSpec};
use crate::model::{BertConfig, EncoderBatch, Weights};
use crate::train::checkpoint::Checkpoint;
use crate::train::metrics::TaskScore;
use crate::train::trainer::{TaskData, TrainSettings, score_split};

/// The models of a run and, per task, (model, task within it).
pub type Placed = (Vec<MultiTaskModel>, Vec<(usize, usize)>);

/// The models of a run: one for every task, or for `separate` one per task, whose own
/// encoder is in its weights when they hold one (a checkpoint's) and `shared` else.
pub fn build_models(
    gpu: &Gpu,
    config: &BertConfig,
    (method, separate): (Method, bool),
    shared: &Weights,
    tasks: &[(TaskSpec, &Weights)],
    training: bool,
) -> Result<Placed> {
    let upload = |shared: &Weights, tasks: &[(TaskSpec, &Weights)]| match training {
        true => MultiTaskModel::upload(gpu, config, method, shared, tasks),
        false => MultiTaskModel::upload_inference(gpu, config, method, shared, tasks),
    };
    if !separate {
        return Ok((vec![upload(shared, tasks)?], (0..tasks.len()).map(|i| (0, i)).collect()));
    }
    let mut models = Vec::new();
    for (spec, weights) in tasks {
        let encoder = if weights.contains_key("pooler.dense.weight") { weights } else { shared };
        models.push(upload(encoder, &[(spec.clone(), weights)])?);
    }
    Ok((models, (0..tasks.len()).map(|i| (i, 0)).collect()))
}

/// Predictions of a task on `split`, in the split's order, from `logits` [B, k] of each
/// batch: class ids (as f32) or regression scores (0–5).
pub fn predict_split(
    spec: &TaskSpec,
    split: &TokenizedSplit,
    options: &BatchOptions,
    logits: &mut dyn FnMut(&EncoderBatch) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; split.examples.len()];
    for batch in eval_batches(split, options, true) {
        let predictions: Vec<f32> = logits(&batch.encoder)?
            .chunks(spec.num_labels)
            .map(|row| match spec.is_regression() {
                true => row[0] * REGRESSION_SCALE,
                false => argmax(row) as f32,
            })
            .collect();
        scatter(&batch, &predictions, &mut out);
    }
    Ok(out)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Every task's dev metrics (at most `limit` examples per split) from `predict(task, split)`.
pub fn evaluate_tasks(
    data: &[TaskData],
    limit: Option<usize>,
    predict: &mut dyn FnMut(usize, &TokenizedSplit) -> Result<Vec<f32>>,
) -> Result<Vec<TaskScore>> {
    let mut scores = Vec::new();
    for (task, t) in data.iter().enumerate() {
        for (name, split) in &t.dev {
            let mut split = split.clone();
            if let Some(limit) = limit {
                split.examples.truncate(limit);
            }
            let predictions = predict(task, &split)?;
            scores.push(score_split(name, &t.source, &split, &predictions)?);
        }
    }
    Ok(scores)
}

/// A checkpoint's model on the GPU for inference: per-task logits for a batch.
pub struct InferenceModel<'g> {
    gpu: &'g Gpu,
    pub settings: TrainSettings,
    pub config: BertConfig,
    models: Vec<MultiTaskModel>,
    place: Vec<(usize, usize)>,
    specs: Vec<TaskSpec>,
    sources: Vec<TaskSource>,
    buckets: HashMap<(usize, usize, usize), (TaskActivations, BatchInputs)>,
}

impl<'g> InferenceModel<'g> {
    /// The checkpoint in `dir` (its weights, config and run settings; no optimizer state).
    pub fn load(gpu: &'g Gpu, dir: &Path) -> Result<InferenceModel<'g>> {
        InferenceModel::from_checkpoint(gpu, &Checkpoint::load(dir, false)?)
    }

    pub fn from_checkpoint(gpu: &'g Gpu, checkpoint: &Checkpoint) -> Result<InferenceModel<'g>> {
        let settings: TrainSettings =
            serde_json::from_value(checkpoint.run.clone()).context("reading the checkpoint's run.json")?;
        let config = checkpoint.config.clone();
        let method = settings.method(&config)?;
        let sources = settings.sources()?;
        let mut tasks = Vec::new();
        for source in &sources {
            let spec = TaskSpec::new(source.name(), source.num_labels());
            let Some(weights) = checkpoint.tasks.get(&spec.name) else {
                bail!(
                    "the checkpoint has no weights for task {} (tasks/{}.safetensors)",
                    spec.name,
                    spec.name
                )
            };
            tasks.push((spec, weights));
        }
        let separate = settings.method == crate::model::tasks::MethodName::Separate;
        let (models, place) =
            build_models(gpu, &config, (method, separate), &checkpoint.shared, &tasks, false)?;
        let specs = tasks.into_iter().map(|(spec, _)| spec).collect();
        Ok(InferenceModel { gpu, settings, config, models, place, specs, sources, buckets: HashMap::new() })
    }

    /// The tasks, in the order `logits` takes them.
    pub fn tasks(&self) -> &[TaskSpec] {
        &self.specs
    }

    /// What the tasks are (label strings, score scale), in the order of [`Self::tasks`].
    pub fn sources(&self) -> &[TaskSource] {
        &self.sources
    }

    /// Task `task`'s logits for `batch`, [B, k] row-major (regression: score / 5).
    pub fn logits(&mut self, task: usize, batch: &EncoderBatch) -> Result<Vec<f32>> {
        let (m, k) = self.upload(task, batch)?;
        let (acts, inputs) = &self.buckets[&(m, batch.batch, batch.seq)];
        let mut rec = self.gpu.recorder();
        self.models[m].forward(&mut rec, acts, inputs, k, None)?;
        rec.submit()?;
        Ok(self.gpu.read(&self.models[m].logits(acts, k)?)?)
    }

    /// One embedding per row of `batch` from the encoder task `task` runs on, without the
    /// task's own modules (the shared encoder, or under `separate` the task's own).
    pub fn embeddings(
        &mut self,
        task: usize,
        batch: &EncoderBatch,
        pooling: Pooling,
    ) -> Result<Vec<Vec<f32>>> {
        let (m, _) = self.upload(task, batch)?;
        let (acts, inputs) = &self.buckets[&(m, batch.batch, batch.seq)];
        let mut rec = self.gpu.recorder();
        self.models[m].bert.forward(&mut rec, &acts.encoder, inputs, None)?;
        rec.submit()?;
        read_embeddings(self.gpu, &acts.encoder, batch, pooling)
    }

    /// Writes `batch` into the buffers of its shape for task `task`'s model (made on first
    /// use); returns (model, task within it).
    fn upload(&mut self, task: usize, batch: &EncoderBatch) -> Result<(usize, usize)> {
        let Some(&(m, k)) = self.place.get(task) else { bail!("task {task} of {}", self.specs.len()) };
        let key = (m, batch.batch, batch.seq);
        if !self.buckets.contains_key(&key) {
            let acts = self.models[m].activations(self.gpu, batch.batch, batch.seq)?;
            let inputs = BatchInputs::new(self.gpu, &self.config, batch.batch, batch.seq)?;
            self.buckets.insert(key, (acts, inputs));
        }
        let (_, inputs) = self.buckets.get_mut(&key).expect("inserted above");
        inputs.write(self.gpu, batch)?;
        Ok((m, k))
    }

    /// Predictions of task `task` on `split` (see [`predict_split`]).
    pub fn predict(&mut self, task: usize, split: &TokenizedSplit) -> Result<Vec<f32>> {
        let options = self.settings.batch_options();
        let spec = self.specs.get(task).cloned().context("no such task")?;
        predict_split(&spec, split, &options, &mut |batch| self.logits(task, batch))
    }

    /// Bytes of GPU memory the buckets' buffers hold.
    pub fn buffer_bytes(&self) -> u64 {
        self.buckets.values().map(|(acts, _)| acts.bytes()).sum()
    }
}
