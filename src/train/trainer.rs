//! The multi-task training loop: one task's batch per step, the whole step (forward, loss,
//! backward, optimizer) recorded into one submit, the loss read back a few steps later
//! (never synchronously every step), evaluation with the official GLUE metrics, the best
//! checkpoint kept, and bit-identical resumption.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::Tokenizer;
use crate::data::batch::{BatchOptions, Labels};
use crate::data::cache::TokenizedSplit;
use crate::data::custom::CustomTask;
use crate::data::glue::{Split, Task};
use crate::data::sampler::{EpochIterator, Sampling, TaskSampler};
use crate::data::source::TaskSource;
use crate::dist::{self, Comm};
use crate::gpu::{Gpu, Tensor, Timing};
use crate::kernels::optimizer::{AdamConfig, ClipMode, LossScaling};
use crate::model::bert::BatchInputs;
use crate::model::tasks::{
    HeadInputs, Method, MethodName, MultiTaskModel, Targets, TaskActivations, TaskSpec,
};
use crate::model::{BertConfig, DropoutKey, EncoderBatch, Weights};
use crate::train::checkpoint::{Checkpoint, ScalerState, TrainerState};
use crate::train::inference::{build_models, evaluate_tasks, predict_split};
use crate::train::log::{EvalRecord, LogWriter, StepRecord};
use crate::train::metrics::{
    TaskScore, glue_average, score_accuracy_macro_f1, score_classification, score_regression,
};
use crate::train::optim::{Optimizer, OptimizerSettings, ScaleRecord};
use crate::train::schedule;

/// The arithmetic of training. Mixed: dynamic loss scaling (as PyTorch's GradScaler) over
/// f32 master weights, gradients and Adam state; it needs an adapter with `shader-f16`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    #[default]
    F32,
    Mixed,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Mixed => "mixed",
        })
    }
}

/// Everything `pals train` was asked: saved as the checkpoint's run.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSettings {
    /// GLUE tasks (`--tasks`).
    pub tasks: Vec<String>,
    /// Custom tasks (`--task NAME=DIR`), after the GLUE ones: name, folder, kind and classes,
    /// so that a checkpoint knows them without their files.
    #[serde(default)]
    pub custom: Vec<CustomTask>,
    pub method: MethodName,
    pub pal_dim: Option<usize>,
    pub batch_size: usize,
    pub max_length: usize,
    pub lr: f32,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub warmup: f64,
    pub sampling: String,
    pub seed: u32,
    /// Overrides the config's hidden and attention dropout.
    pub dropout: Option<f64>,
    /// adamw or bert-adam.
    pub optimizer: String,
    /// global, per-tensor or none.
    pub clip: String,
    pub max_norm: f32,
    pub weight_decay: f32,
    /// Evaluate at most this many dev examples per task (all when absent).
    pub max_eval_examples: Option<usize>,
    /// Stop after this many steps in this run (the schedule still spans the whole run):
    /// for short checks and for testing resumption.
    pub stop_after: Option<u64>,
    /// f32 or mixed (runs saved before it existed are f32).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for TrainSettings {
    /// The paper's recipe: batch 32, length 128, lr 2e-5, warmup 10%, annealed sampling,
    /// seed 42, AdamW (bias-corrected) with weight decay 0.01, clipping at global norm 1.
    fn default() -> Self {
        TrainSettings {
            tasks: Vec::new(),
            custom: Vec::new(),
            method: MethodName::Pals,
            pal_dim: None,
            batch_size: 32,
            max_length: 128,
            lr: 2e-5,
            epochs: 3,
            steps_per_epoch: 2400,
            warmup: schedule::DEFAULT_WARMUP,
            sampling: "annealed".into(),
            seed: 42,
            dropout: None,
            optimizer: "adamw".into(),
            clip: "global".into(),
            max_norm: 1.0,
            weight_decay: 0.01,
            max_eval_examples: None,
            stop_after: None,
            precision: Precision::F32,
        }
    }
}

impl TrainSettings {
    /// Every task of the run in training order: the GLUE ones, then the custom ones.
    pub fn sources(&self) -> Result<Vec<TaskSource>> {
        let glue = self.tasks.iter().map(|name| Ok(TaskSource::Glue(Task::from_name(name)?)));
        let custom = self.custom.iter().map(|task| Ok(TaskSource::Custom(task.clone())));
        glue.chain(custom).collect()
    }

    pub fn total_steps(&self) -> u64 {
        (self.epochs * self.steps_per_epoch) as u64
    }

    pub fn optimizer_settings(&self) -> Result<OptimizerSettings> {
        let adam = match self.optimizer.as_str() {
            "adamw" => AdamConfig::adamw(),
            "bert-adam" | "bertadam" => AdamConfig::bert_adam(),
            other => bail!("--optimizer '{other}': use adamw or bert-adam"),
        };
        let clip = match self.clip.as_str() {
            "global" => ClipMode::Global,
            "per-tensor" => ClipMode::PerTensor,
            "none" => ClipMode::None,
            other => bail!("--clip '{other}': use global, per-tensor or none"),
        };
        let scaling = (self.precision == Precision::Mixed).then(LossScaling::default);
        Ok(OptimizerSettings {
            adam,
            weight_decay: self.weight_decay,
            clip,
            max_norm: self.max_norm,
            scaling,
        })
    }

    /// The method for a model of `config`; `separate` trains `Shared` models, one per task.
    pub fn method(&self, config: &BertConfig) -> Result<Method> {
        let name = if self.method == MethodName::Separate { MethodName::Shared } else { self.method };
        let mut method = Method::sized(name, config);
        if let (Method::Pals { dim, .. }, Some(size)) = (&mut method, self.pal_dim) {
            *dim = size;
        }
        method.check().map_err(|e| anyhow::anyhow!("--method {}: {e}", self.method))?;
        Ok(method)
    }
}

/// One task's data: what it trains on and the dev splits it is scored on.
pub struct TaskData {
    /// The model's view of the task: its name and outputs (from `source`).
    pub spec: TaskSpec,
    pub source: TaskSource,
    pub train: TokenizedSplit,
    /// (score name, split): "MNLI-m" and "MNLI-mm" for MNLI, the task's name else.
    pub dev: Vec<(String, TokenizedSplit)>,
}

impl TaskData {
    pub fn new(source: TaskSource, train: TokenizedSplit, dev: Vec<(String, TokenizedSplit)>) -> TaskData {
        let spec = TaskSpec::new(source.name(), source.num_labels());
        TaskData { spec, source, train, dev }
    }
}

/// Reads and tokenizes (through the cache) the train and dev splits of `tasks`; GLUE tasks
/// from `glue_dir`, custom ones from their folders. Without `with_train` (eval, predict) no
/// train file is read, and the train split is left empty.
pub fn load_tasks(
    tokenizer: &Tokenizer,
    glue_dir: Option<&Path>,
    tasks: &[TaskSource],
    max_len: usize,
    cache_dir: Option<&Path>,
    with_train: bool,
) -> Result<Vec<TaskData>> {
    let mut data = Vec::new();
    for source in tasks {
        let read = |split| source.tokenized(tokenizer, glue_dir, split, max_len, cache_dir);
        let train = match with_train {
            true => read(Split::Train)?,
            false => TokenizedSplit::empty(source.name(), Split::Train),
        };
        let mut dev = Vec::new();
        for (name, split) in source.dev_splits() {
            match read(split) {
                Ok(tokens) => dev.push((name, tokens)),
                // MNLI's mismatched dev set is optional.
                Err(error) if split == Split::DevMismatched => {
                    eprintln!("note: {error}; MNLI is scored on matched dev only")
                }
                Err(error) => return Err(error.into()),
            }
        }
        data.push(TaskData::new(source.clone(), train, dev));
    }
    Ok(data)
}

/// Buffers of one (model, batch, seq) shape, made on first use and reused.
struct Bucket {
    acts: TaskActivations,
    inputs: BatchInputs,
    head: HeadInputs,
}

/// Steps whose loss is on the GPU but not yet read.
const LOSS_RING: usize = 32;
/// The ring holds, per slot, the loss at [slot], the loss scale the step used at
/// [slot + LOSS_RING] and whether the step was skipped (1) at [slot + 2 LOSS_RING].
const RING_ROWS: usize = 3;

pub struct Trainer<'g> {
    gpu: &'g Gpu,
    pub settings: TrainSettings,
    pub config: BertConfig,
    /// One model for every method but `separate`, which has one per task.
    models: Vec<MultiTaskModel>,
    /// Task i lives in models[place[i].0] as its task place[i].1.
    place: Vec<(usize, usize)>,
    pub data: Vec<TaskData>,
    optimizer: Optimizer,
    /// The optimizer's names of the tensors each task's step updates, in update order.
    step_names: Vec<Vec<String>>,
    sampler: TaskSampler,
    iterators: Vec<EpochIterator>,
    buckets: HashMap<(usize, usize, usize), Bucket>,
    /// [RING_ROWS, LOSS_RING]: one slot per step not yet read back. One tensor, so each
    /// step binds the same buffers and the loss copy needs no new bind group.
    losses: Tensor,
    /// (step, task, lr, this rank's share of the step's loss) of steps not yet read.
    pending: Vec<(u64, usize, f32, f32)>,
    pub state: TrainerState,
    output: PathBuf,
    tokenizer_dir: PathBuf,
    log: Option<LogWriter>,
    started: Instant,
    /// The mean of the losses read at the last flush, for the progress line.
    pub recent_loss: Option<f32>,
    /// With loss scaling: the scale of the last step read back.
    pub recent_scale: Option<f32>,
    /// Dispatches in the last step's submit.
    pub dispatches: usize,
    /// The ranks training this model together (one without mpirun).
    comm: &'static dyn Comm,
    /// How much of the gradient reduction the backward hid (several ranks only).
    pub overlap: dist::Overlap,
}

/// Steps between the checks that every rank holds the same parameters.
const REPLICA_CHECK_EVERY: u64 = 200;

/// The optimizer's name for a parameter: model copies of `separate` are told apart.
fn state_name(separate: bool, task: &str, name: &str) -> String {
    if separate { format!("{task}/{name}") } else { name.to_string() }
}

impl<'g> Trainer<'g> {
    /// A trainer from initial weights: `shared` (encoder + pooler) and, per task, its
    /// task-specific weights (random ones are made for tasks without).
    pub fn new(
        gpu: &'g Gpu,
        settings: TrainSettings,
        config: BertConfig,
        shared: &Weights,
        task_weights: &BTreeMap<String, Weights>,
        data: Vec<TaskData>,
        output: &Path,
        tokenizer_dir: &Path,
    ) -> Result<Trainer<'g>> {
        if data.is_empty() {
            bail!("no tasks to train (--tasks, --task)");
        }
        let method = settings.method(&config)?;
        let comm = dist::world();
        dist::check_batch_size(comm, settings.batch_size)?;
        let separate = settings.method == MethodName::Separate;
        let weights: Vec<Weights> = data
            .iter()
            .enumerate()
            .map(|(i, t)| {
                task_weights.get(&t.spec.name).cloned().unwrap_or_else(|| {
                    crate::model::tasks::random_task_weights(
                        &config,
                        &method,
                        &t.spec,
                        settings.seed ^ (i as u32 + 1),
                    )
                })
            })
            .collect();
        let specs: Vec<(TaskSpec, &Weights)> =
            data.iter().zip(&weights).map(|(t, w)| (t.spec.clone(), w)).collect();
        let (models, place) = build_models(gpu, &config, (method, separate), shared, &specs, true)?;
        // What each task's step updates: the (shared or own) encoder, then the task's own.
        let step_tensors = |i: usize| {
            let (m, k) = place[i];
            models[m].bert.params.named.iter().chain(&models[m].tasks[k].params.named)
        };
        let step_names: Vec<Vec<String>> = data
            .iter()
            .enumerate()
            .map(|(i, t)| step_tensors(i).map(|(name, _)| state_name(separate, &t.spec.name, name)).collect())
            .collect();
        let mut named = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, names) in step_names.iter().enumerate() {
            for (name, (_, tensor)) in names.iter().zip(step_tensors(i)) {
                if seen.insert(name.clone()) {
                    named.push((name.clone(), tensor.len()));
                }
            }
        }
        let mut optimizer = Optimizer::new(gpu, &named, settings.optimizer_settings()?)?;
        let mut models = models;
        if settings.precision == Precision::Mixed {
            for (i, t) in data.iter().enumerate() {
                let (m, _) = place[i];
                for (name, copy) in models[m].bert.use_f16_weights(gpu)? {
                    optimizer.keep_half_copy(&state_name(separate, &t.spec.name, &name), copy)?;
                }
            }
        }
        let sampling = Sampling::from_name(&settings.sampling)?;
        let sizes: Vec<usize> = data.iter().map(|t| t.train.examples.len()).collect();
        let sampler =
            TaskSampler::new(&sizes, sampling, settings.epochs, settings.steps_per_epoch, settings.seed)?;
        let options = train_options(&settings);
        let iterators = data
            .iter()
            .enumerate()
            .map(|(i, t)| {
                EpochIterator::new(
                    t.train.clone(),
                    options,
                    settings.seed.wrapping_add(1000 * (i as u32 + 1)),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_precision(gpu, settings.precision)?;
        let losses = gpu.zeros("losses", &[RING_ROWS, LOSS_RING])?;
        Ok(Trainer {
            gpu,
            settings,
            config,
            models,
            place,
            data,
            optimizer,
            sampler,
            iterators,
            step_names,
            buckets: HashMap::new(),
            losses,
            pending: Vec::new(),
            state: TrainerState { ranks: comm.size(), ..TrainerState::default() },
            output: output.to_path_buf(),
            tokenizer_dir: tokenizer_dir.to_path_buf(),
            log: None,
            started: Instant::now(),
            recent_loss: None,
            recent_scale: None,
            dispatches: 0,
            comm,
            overlap: dist::Overlap::default(),
        })
    }

    /// Replaces the loss scaler of a mixed-precision run by one starting afresh from
    /// `scaling` (GradScaler's constants otherwise): for tests, which force overflows with a
    /// huge scale and growth with a short interval.
    pub fn set_loss_scaling(&mut self, scaling: LossScaling) -> Result<()> {
        if self.settings.precision != Precision::Mixed {
            bail!("loss scaling is part of --precision mixed; this run is {}", self.settings.precision);
        }
        self.optimizer.settings.scaling = Some(scaling);
        self.optimizer.restore_scaler(self.gpu, scaling.init_scale, 0)?;
        Ok(())
    }

    fn separate(&self) -> bool {
        self.settings.method == MethodName::Separate
    }

    /// Continues from a checkpoint saved by this trainer: weights, optimizer moments, step,
    /// and the data iterators replayed to where they were.
    pub fn restore(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let Some(optimizer) = &checkpoint.optimizer else { bail!("the checkpoint has no optimizer state") };
        for (i, t) in self.data.iter().enumerate() {
            let (m, k) = self.place[i];
            let task_weights = checkpoint
                .tasks
                .get(&t.spec.name)
                .with_context(|| format!("no weights for task {}", t.spec.name))?;
            let shared = if self.separate() { task_weights } else { &checkpoint.shared };
            for (name, tensor) in &self.models[m].bert.params.named {
                let saved = shared.get(name).with_context(|| format!("checkpoint lacks '{name}'"))?;
                self.gpu.write(tensor, &saved.data)?;
            }
            for (name, tensor) in &self.models[m].tasks[k].params.named {
                let saved = task_weights.get(name).with_context(|| format!("checkpoint lacks '{name}'"))?;
                self.gpu.write(tensor, &saved.data)?;
            }
        }
        self.optimizer.restore(self.gpu, optimizer, &checkpoint.state.adam_steps)?;
        if self.settings.precision == Precision::Mixed {
            for model in &mut self.models {
                // The same copies, cast again from the restored weights.
                model.bert.use_f16_weights(self.gpu)?;
            }
        }
        if let Some(scaler) = checkpoint.state.loss_scale {
            self.optimizer.restore_scaler(self.gpu, scaler.scale, scaler.growth)?;
        }
        if let Some(note) =
            dist::resume_note(self.comm, checkpoint.state.ranks).filter(|_| self.comm.rank() == 0)
        {
            eprintln!("{note}");
        }
        self.state = TrainerState { ranks: self.comm.size(), ..checkpoint.state.clone() };
        for step in 0..self.state.step {
            let task = self.sampler.next(step);
            self.iterators[task].next_batch();
        }
        Ok(())
    }

    /// Everything a checkpoint holds, read from the GPU.
    pub fn checkpoint(&self, with_optimizer: bool) -> Result<Checkpoint> {
        let mut tasks = BTreeMap::new();
        for (i, t) in self.data.iter().enumerate() {
            let (m, k) = self.place[i];
            let mut weights = self.models[m].download_task_weights(self.gpu, k)?;
            if self.separate() {
                weights.extend(self.models[m].bert.download_weights(self.gpu)?);
            }
            tasks.insert(t.spec.name.clone(), weights);
        }
        let shared =
            if self.separate() { Weights::new() } else { self.models[0].bert.download_weights(self.gpu)? };
        let (optimizer, adam_steps) = match with_optimizer {
            true => {
                let (moments, steps) = self.optimizer.download(self.gpu)?;
                (Some(moments), steps)
            }
            false => (None, BTreeMap::new()),
        };
        let loss_scale = match (with_optimizer, self.optimizer.settings.scaling) {
            (true, Some(_)) => {
                let (scale, growth) = self.optimizer.download_scaler(self.gpu)?;
                Some(ScalerState { scale, growth })
            }
            _ => None,
        };
        let state = TrainerState { adam_steps, loss_scale, ..self.state.clone() };
        Ok(Checkpoint {
            run: serde_json::to_value(&self.settings)?,
            config: self.config.clone(),
            shared,
            tasks,
            optimizer,
            state,
        })
    }

    /// Saves `output/name`; only rank 0 writes.
    pub fn save(&self, name: &str, with_optimizer: bool) -> Result<()> {
        if self.comm.rank() != 0 {
            return Ok(());
        }
        self.checkpoint(with_optimizer)?.save(&self.output.join(name), &self.tokenizer_dir)
    }

    fn bucket(&mut self, model: usize, batch: usize, seq: usize) -> Result<&mut Bucket> {
        let key = (model, batch, seq);
        if !self.buckets.contains_key(&key) {
            let acts = self.models[model].activations(self.gpu, batch, seq)?;
            let inputs = BatchInputs::new(self.gpu, &self.config, batch, seq)?;
            let mut head = HeadInputs::new(self.gpu, batch)?;
            // With loss scaling the loss backward reads the optimizer's live scale.
            if self.optimizer.settings.scaling.is_some() {
                head.loss_scale = self.optimizer.loss_scale();
            }
            self.buckets.insert(key, Bucket { acts, inputs, head });
        }
        Ok(self.buckets.get_mut(&key).expect("inserted above"))
    }

    /// Trains until the schedule ends, `stop_after` steps are done, or `interrupted` is
    /// set; evaluates after every epoch. Returns the last evaluation.
    pub fn run(
        &mut self,
        interrupted: &AtomicBool,
        progress: &indicatif::ProgressBar,
    ) -> Result<Vec<TaskScore>> {
        let lead = self.comm.rank() == 0;
        if lead {
            std::fs::create_dir_all(&self.output)
                .with_context(|| format!("creating {}", self.output.display()))?;
            let log_path = self.output.join("metrics.jsonl");
            self.log = Some(match self.state.step {
                0 => LogWriter::create(&log_path)?,
                done => LogWriter::resume(&log_path, done as u32)?,
            });
        }
        let total = self.settings.total_steps();
        let stop = self.settings.stop_after.map_or(total, |n| (self.state.step + n).min(total));
        let mut last_scores = Vec::new();
        progress.set_length(total);
        progress.set_position(self.state.step);
        while self.state.step < stop {
            if dist::any_rank(self.comm, interrupted.load(Ordering::SeqCst)) {
                say(progress, "interrupted: saving a resumable checkpoint".into());
                break;
            }
            self.train_step()?;
            progress.set_position(self.state.step);
            let epoch_done = self.state.step.is_multiple_of(self.settings.steps_per_epoch as u64);
            if self.pending.len() >= LOSS_RING / 2 || epoch_done || self.state.step == stop {
                self.flush_losses()?;
            }
            if let Some(loss) = self.recent_loss {
                let task = &self.data[self.pending_task()].spec.name;
                let lr = schedule::lr(
                    self.state.step as u32,
                    total as u32,
                    self.settings.warmup,
                    self.settings.lr,
                );
                let mut message = format!("{task:<6} loss {loss:.4} lr {lr:.2e}");
                if let Some(scale) = self.recent_scale {
                    message += &format!(" scale {scale} skipped {}", self.state.skipped_steps);
                }
                let plain = progress.is_hidden() && lead;
                if plain && self.state.step.is_multiple_of(plain_every(&self.settings)) {
                    eprintln!("step {}/{total}  {message}", self.state.step);
                }
                progress.set_message(message);
            }
            if self.state.step.is_multiple_of(REPLICA_CHECK_EVERY) {
                self.check_replicas()?;
            }
            // Every rank predicts its slice of the dev sets; rank 0 alone records and saves.
            if epoch_done {
                last_scores = self.evaluate()?;
                if lead {
                    self.record_eval(&last_scores, progress)?;
                    self.save("last", true)?;
                }
            }
        }
        self.flush_losses()?;
        self.check_replicas()?;
        self.save("last", true)?;
        self.log = None;
        if let Some(line) = self.overlap.report().filter(|_| lead) {
            say(progress, line);
        }
        Ok(last_scores)
    }

    fn pending_task(&self) -> usize {
        self.sampler.next(self.state.step.saturating_sub(1))
    }

    /// One step: the sampled task's batch forward and backward, its loss copied into the
    /// ring, and the optimizer on the shared parameters and that task's — one submit.
    pub fn train_step(&mut self) -> Result<()> {
        self.step_with(false).map(|_| ())
    }

    /// `train_step`, then waits and returns each dispatch's GPU time (empty where the
    /// adapter has no timestamps inside passes): what `pals bench` reports.
    pub fn train_step_timed(&mut self) -> Result<Vec<Timing>> {
        self.step_with(true)
    }

    fn step_with(&mut self, timed: bool) -> Result<Vec<Timing>> {
        let step = self.state.step;
        let task = self.sampler.next(step);
        let (batch, share) = dist::shard(self.iterators[task].next_batch(), self.comm);
        let (m, k) = self.place[task];
        let (gpu, b, s) = (self.gpu, batch.encoder.batch, batch.encoder.seq);
        let targets = targets(&batch.labels)?;
        let lr = schedule::lr(
            step as u32,
            self.settings.total_steps() as u32,
            self.settings.warmup,
            self.settings.lr,
        );
        // A rank's rows are its slice of the global batch: it draws that slice's masks.
        let shard = self.comm.rank() as u32;
        let dropout = Some(DropoutKey { shard, ..DropoutKey::new(self.settings.seed, step as u32) });
        let slot = self.pending.len() % LOSS_RING;
        {
            let bucket = self.bucket(m, b, s)?;
            bucket.inputs.write(gpu, &batch.encoder)?;
            bucket.head.write(gpu, &targets, &batch.weights)?;
        }
        let bucket = &self.buckets[&(m, b, s)];
        let model = &self.models[m];
        let mut rec = gpu.recorder();
        rec.round_products_to_f16(self.settings.precision == Precision::Mixed);
        let loss =
            model.forward_backward(&mut rec, &bucket.acts, &bucket.inputs, &bucket.head, k, dropout)?;
        // A copy keeps this step's loss until it is read back.
        rec.copy(loss, 0, &self.losses, slot, 1)?;
        let shared = model.bert.params.named.iter().zip(&model.bert.grads()?.named);
        let own = model.tasks[k].params.named.iter().zip(&model.tasks[k].grads()?.named);
        let params: Vec<(&str, &Tensor, &Tensor)> = shared
            .chain(own)
            .zip(&self.step_names[task])
            .map(|(((_, p), (_, g)), n)| (n.as_str(), p, g))
            .collect();
        if self.comm.size() > 1 {
            // The global batch's gradient, summed over the ranks as the backward produces it.
            let grads: Vec<&Tensor> = params.iter().map(|&(_, _, g)| g).collect();
            dist::submit_and_sum_gradients(gpu, self.comm, rec, &grads, share, &mut self.overlap)?;
            rec = gpu.recorder();
        }
        let record =
            ScaleRecord { record: &self.losses, slot: (LOSS_RING + slot) as u32, stride: LOSS_RING as u32 };
        self.optimizer.step(&mut rec, &params, lr, &record)?;
        self.dispatches = rec.len();
        let timings = if timed { rec.submit_timed()? } else { rec.submit().map(|_| Vec::new())? };
        self.pending.push((step, task, lr, share));
        self.state.step += 1;
        Ok(timings)
    }

    /// Reads the losses of the steps submitted since the last flush (this waits for them)
    /// and writes their log lines.
    fn flush_losses(&mut self) -> Result<()> {
        let mut sum = 0.0;
        let pending = std::mem::take(&mut self.pending);
        let ring = if pending.is_empty() { Vec::new() } else { self.gpu.read::<f32>(&self.losses)? };
        // Each rank's loss is its rows' mean: the global batch's is Σ share·loss.
        let mut losses: Vec<f32> =
            pending.iter().enumerate().map(|(slot, &(.., share))| share * ring[slot]).collect();
        self.comm.sum(&mut losses);
        let scaling = self.optimizer.settings.scaling.is_some();
        for (slot, (&(step, task, lr, _), &loss)) in pending.iter().zip(&losses).enumerate() {
            if !loss.is_finite() {
                bail!("the loss of step {step} ({}) is {loss}: training diverged", self.data[task].spec.name);
            }
            sum += loss;
            // Every rank reduced the same gradients, so every rank saw the same scale and skip.
            let (scale, skipped) = (ring[LOSS_RING + slot], ring[2 * LOSS_RING + slot] != 0.0);
            if scaling {
                self.state.skipped_steps += skipped as u64;
                self.recent_scale = Some(scale);
            }
            if let Some(log) = &mut self.log {
                let task = self.data[task].spec.name.clone();
                log.step(StepRecord {
                    step: step as u32,
                    task,
                    loss,
                    lr,
                    time: self.started.elapsed().as_secs_f64(),
                    scale: scaling.then_some(scale),
                    skipped: scaling.then_some(skipped),
                })?;
            }
        }
        if !pending.is_empty() {
            self.recent_loss = Some(sum / pending.len() as f32);
        }
        Ok(())
    }

    /// Stops the run if the ranks' parameters differ (they never should: every rank applies
    /// the same reduced gradients). A no-op for one process.
    fn check_replicas(&self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mut hash = dist::HASH_START;
        for model in &self.models {
            let tasks = model.tasks.iter().flat_map(|t| &t.params.named);
            for (_, tensor) in model.bert.params.named.iter().chain(tasks) {
                hash = dist::hash_bits(hash, &self.gpu.read::<u32>(tensor)?);
            }
        }
        let what = format!("the parameters after step {}", self.state.step);
        dist::check_same_hash(self.comm, &what, hash)
    }

    fn record_eval(&mut self, scores: &[TaskScore], progress: &indicatif::ProgressBar) -> Result<()> {
        self.state.evals += 1;
        let average = glue_average(scores);
        if let Some(log) = &mut self.log {
            log.eval(EvalRecord::new(self.state.evals as u32, self.state.step as u32, scores))?;
        }
        let line = format!(
            "step {}: dev GLUE average {:.2} ({})",
            self.state.step,
            100.0 * average,
            scores
                .iter()
                .map(|s| format!("{} {:.1}", s.task, 100.0 * s.score))
                .collect::<Vec<_>>()
                .join(", ")
        );
        say(progress, line);
        if self.state.best_score.is_none_or(|best| average > best) {
            self.state.best_score = Some(average);
            self.state.best_step = Some(self.state.step);
            self.save("best", false)?;
        }
        Ok(())
    }

    /// Task `task`'s logits [B, k] for `batch`, from the training model.
    fn logits(&mut self, task: usize, batch: &EncoderBatch) -> Result<Vec<f32>> {
        let (m, k) = self.place[task];
        let (b, s, gpu) = (batch.batch, batch.seq, self.gpu);
        self.bucket(m, b, s)?.inputs.write(gpu, batch)?;
        let bucket = &self.buckets[&(m, b, s)];
        let mut rec = self.gpu.recorder();
        rec.round_products_to_f16(self.settings.precision == Precision::Mixed);
        self.models[m].forward(&mut rec, &bucket.acts, &bucket.inputs, k, None)?;
        rec.submit()?;
        Ok(self.gpu.read(&self.models[m].logits(&bucket.acts, k)?)?)
    }

    /// Predictions of task `task` on `split`, in the split's order: class ids (as f32) or
    /// regression scores (0–5).
    pub fn predict(&mut self, task: usize, split: &TokenizedSplit) -> Result<Vec<f32>> {
        let spec = self.data[task].spec.clone();
        self.predict_as(&spec, task, split)
    }

    fn predict_as(&mut self, spec: &TaskSpec, task: usize, split: &TokenizedSplit) -> Result<Vec<f32>> {
        let options = train_options(&self.settings);
        predict_split(spec, split, &options, &mut |batch| self.logits(task, batch))
    }

    /// Every task's dev metrics (at most `max_eval_examples` examples each); under mpirun
    /// each rank predicts a slice and every rank scores the gathered predictions.
    pub fn evaluate(&mut self) -> Result<Vec<TaskScore>> {
        let data = std::mem::take(&mut self.data);
        let (limit, comm) = (self.settings.max_eval_examples, self.comm);
        let scores = evaluate_tasks(&data, limit, &mut |task, split| {
            dist::predict_sharded(comm, split, &mut |part| self.predict_as(&data[task].spec, task, part))
        });
        self.data = data;
        scores
    }
}

impl TrainSettings {
    /// How evaluation batches this run's data.
    pub fn batch_options(&self) -> BatchOptions {
        train_options(self)
    }
}

/// Mixed precision needs f16 in shaders: refused, naming the adapter, where it lacks them.
pub fn check_precision(gpu: &Gpu, precision: Precision) -> Result<()> {
    if precision == Precision::Mixed && !gpu.has(wgpu::Features::SHADER_F16) {
        bail!(
            "config error: --precision mixed needs the shader-f16 feature, which adapter {} lacks; \
             use --precision f32 or another --adapter",
            gpu.describe()
        );
    }
    Ok(())
}

/// Prints above the progress bar, or as a plain line where there is no bar (stderr not a
/// terminal: nohup, Slurm, CI), where `println` would drop it.
fn say(progress: &indicatif::ProgressBar, line: String) {
    if progress.is_hidden() { eprintln!("{line}") } else { progress.println(line) }
}

/// Steps between plain progress lines when there is no bar: ten a epoch.
fn plain_every(settings: &TrainSettings) -> u64 {
    (settings.steps_per_epoch as u64 / 10).max(1)
}

fn train_options(settings: &TrainSettings) -> BatchOptions {
    BatchOptions { batch_size: settings.batch_size, pad_to_batch: true, seq_multiple: 8, pad_id: 0 }
}

fn targets(labels: &Labels) -> Result<Targets> {
    match labels {
        Labels::Class(v) => Ok(Targets::Classes(v.clone())),
        Labels::Score(v) => Ok(Targets::Scores(v.clone())),
        Labels::None => bail!("training data without labels"),
    }
}

/// The task's metrics on a dev split (GLUE's official one for GLUE tasks) from predictions
/// in its order.
pub fn score_split(
    name: &str,
    source: &TaskSource,
    split: &TokenizedSplit,
    predictions: &[f32],
) -> Result<TaskScore> {
    use crate::data::glue::Label;
    if source.is_regression() {
        let labels: Vec<f32> = split
            .examples
            .iter()
            .map(|e| match e.label {
                Some(Label::Score(s)) => Ok(s),
                _ => Err(anyhow::anyhow!("{name}: a dev example without a score")),
            })
            .collect::<Result<_>>()?;
        return Ok(score_regression(name, predictions, &labels));
    }
    let labels: Vec<u32> = split
        .examples
        .iter()
        .map(|e| match e.label {
            Some(Label::Class(c)) => Ok(c),
            _ => Err(anyhow::anyhow!("{name}: a dev example without a class")),
        })
        .collect::<Result<_>>()?;
    let classes: Vec<u32> = predictions.iter().map(|&p| p as u32).collect();
    match source.is_custom_classification() {
        true => Ok(score_accuracy_macro_f1(name, &classes, &labels)),
        false => Ok(score_classification(name, &classes, &labels)),
    }
}
