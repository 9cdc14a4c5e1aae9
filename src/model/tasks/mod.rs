//! Task-specific modules and heads for multi-task BERT (Stickland & Murray 2019, "BERT and
//! PALs"), on the GPU: one shared encoder, and per task a few parameters inside every layer
//! and a classifier head. The CPU twin is src/reference/tasks/, file for file.
//!
//! # Methods (h is a layer's input, a its LN1 output, x = Dropout_ao(ctx·Woᵀ + bo))
//! ```text
//! shared    nothing inside the layers
//! pals      out = LN2(Dropout_ffn(FFN(a)) + a + TS(h)),  TS(h) = GELU(V^D·MHA_l(V^E·h + b_E) + b_D)
//!           V^E [P, H], V^D [H, P] shared by all layers; per layer Q, K, V [P, P] with biases;
//!           `heads` heads of P/heads, no output projection, the encoder's additive mask, and
//!           dropout on the probabilities (attention_probs_dropout_prob, site(l, TaskSpecific)).
//! low-rank  the same placement, TS(h) = V^D_l·GELU(V^E_l·h + b_E) + b_D, V^E_l [r, H], V^D_l [H, r]
//! adapters  a = LN1(h + x + A1_l(x)),  out = LN2(a + Dropout_ffn(FFN(a)) + A2_l(a)),
//!           A(x) = U·GELU(D·x + b_D) + b_U with D [s, H], U [H, s]
//! top-attn  nothing inside the layers; the last layer's output y is replaced by
//!           up(B_{n-1}(…B_0(down(y)))), down [P, H], up [H, P], with n blocks in P dims:
//!           B_i(x) = LN_i(Dropout(MHA_i(x)·W_Oᵀ + b_O) + x), MHA_i with Q, K, V [P, P] and
//!           biases, `heads` heads of P/heads, the encoder's mask and attention-probability
//!           dropout; LN_i over P. The pooler reads the replaced output ([CLS] row).
//! separate  one full encoder copy per task: each task is trained as its own single-task
//!           `shared` model (no task-specific terms), so this module only counts it.
//! ```
//! Each method lives in its own file (`shared`, `pals`, `low_rank`, `adapters`,
//! `top_attn`) behind the [`TaskMethod`] interface of `method.rs`, the one place a method
//! is chosen. Head: logits = Dropout_head(pooled)·Wᵀ + b, W [k, H] (the pooler is shared); dropout
//! hidden_dropout_prob at site [`SITE_HEAD`]. Loss: the weighted mean cross-entropy over k ≥ 2
//! classes, or for k = 1 (STS-B) the weighted mean squared error against score / 5 (the
//! original code divides the 0–5 score by 5, so the prediction times 5 is the score).
//!
//! # Names
//! A task's parameters are named `tasks.<TASK>.…`, apart from the encoder's, so that a
//! checkpoint can keep each task in its own file:
//! ```text
//! tasks.<T>.head.{weight,bias}                                         [k, H], [k]
//! tasks.<T>.pal.encoder.{weight,bias}                                  [P, H], [P]
//! tasks.<T>.pal.decoder.{weight,bias}                                  [H, P], [H]
//! tasks.<T>.pal.layer.<l>.{query,key,value}.{weight,bias}              [P, P], [P]
//! tasks.<T>.low_rank.layer.<l>.encoder.{weight,bias}                   [r, H], [r]
//! tasks.<T>.low_rank.layer.<l>.decoder.{weight,bias}                   [H, r], [H]
//! tasks.<T>.adapter.layer.<l>.{attention,ffn}.down.{weight,bias}       [s, H], [s]
//! tasks.<T>.adapter.layer.<l>.{attention,ffn}.up.{weight,bias}         [H, s], [H]
//! tasks.<T>.top.down.{weight,bias}                                     [P, H], [P]
//! tasks.<T>.top.block.<i>.{query,key,value,output}.{weight,bias}       [P, P], [P]
//! tasks.<T>.top.block.<i>.LayerNorm.{weight,bias}                      [P], [P]
//! tasks.<T>.top.up.{weight,bias}                                       [H, P], [H]
//! ```
//! New parameters start as BERT's: weights N(0, 0.02)-like, biases 0, LayerNorm γ = 1 and
//! β = 0. The top's LayerNorm names contain "LayerNorm" so that the optimizer's no-decay rule
//! covers them.
//!
//! # A training step
//! One step trains ONE task's batch ([`MultiTaskModel::forward_backward`]): the encoder runs
//! with that task's terms (a [`LayerHook`]), then its head and loss; the backward overwrites
//! the encoder's gradients and that task's. Other tasks' gradients are not touched, so they
//! hold whatever their last step left: an optimizer must update only the sampled task (the
//! original code's momentum and weight decay on unsampled tasks is not to be copied).
//!
//! A term joins LN1's or LN2's input by `elementwise::add_assign` (y += x).

pub mod adapters;
pub mod low_rank;
pub mod method;
pub mod pals;
pub mod shared;
pub mod top_attn;

pub use method::{
    ADAPTER_BASE, Bucket, LOW_RANK_BASE, Method, MethodActs, MethodName, PAL_DIM_BASE, PAL_HEADS, TOP_BLOCKS,
    TOP_DIM_BASE, TOP_HEADS, TaskMethod, TaskTerms,
};

use super::bert::{Activations, BatchInputs, Bert, ByName, download_named, make_named, upload_named};
use super::blocks::{
    Alloc, GradMode, Linear, Planned, allocate, dropout_backward, dropout_finish, dropout_target, plan_of,
    shape_error,
};
use super::{BertConfig, DropoutKey, HostTensor, SITE_HEAD, Weights, param_count as bert_param_count};
use crate::contract::DropoutSpec;
use crate::error::ModelError;
use crate::gpu::ElementType::F32;
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::kernels::loss;
use crate::kernels::matmul::Epilogue;

/// Regression targets are score / 5, as in the original code: STS-B's 0–5 scale to 0–1.
pub const REGRESSION_SCALE: f32 = 5.0;

/// A task: its name (used in parameter names) and its number of outputs; 1 is regression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    pub name: String,
    pub num_labels: usize,
}

impl TaskSpec {
    pub fn new(name: &str, num_labels: usize) -> TaskSpec {
        TaskSpec { name: name.to_string(), num_labels }
    }

    pub fn is_regression(&self) -> bool {
        self.num_labels == 1
    }

    /// The eight GLUE tasks of the paper: MNLI has 3 classes, STS-B is regression.
    pub fn glue() -> Vec<TaskSpec> {
        [
            ("CoLA", 2),
            ("SST-2", 2),
            ("MRPC", 2),
            ("STS-B", 1),
            ("QQP", 2),
            ("MNLI", 3),
            ("QNLI", 2),
            ("RTE", 2),
        ]
        .into_iter()
        .map(|(name, k)| TaskSpec::new(name, k))
        .collect()
    }
}

/// What one batch trains against: class ids, or regression scores on their own scale
/// (STS-B 0–5; the model regresses score / [`REGRESSION_SCALE`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    Classes(Vec<u32>),
    Scores(Vec<f32>),
}

impl Targets {
    pub fn len(&self) -> usize {
        match self {
            Targets::Classes(v) => v.len(),
            Targets::Scores(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The 32-bit words the loss kernel reads: class ids, or the bits of score / 5.
    pub fn words(&self) -> Vec<u32> {
        match self {
            Targets::Classes(v) => v.clone(),
            Targets::Scores(v) => v.iter().map(|s| (s / REGRESSION_SCALE).to_bits()).collect(),
        }
    }
}

pub fn task_prefix(task: &str) -> String {
    format!("tasks.{task}.")
}

/// Every task-specific parameter of `task` with its shape: the method's, then the head.
pub fn task_param_shapes(c: &BertConfig, method: &Method, task: &TaskSpec) -> Vec<(String, Vec<usize>)> {
    let prefix = task_prefix(&task.name);
    let mut shapes = method.imp().param_shapes(c, &prefix);
    shapes.extend(method::linear_shapes(format!("{prefix}head"), task.num_labels, c.hidden_size));
    shapes
}

fn count(shapes: &[(String, Vec<usize>)]) -> usize {
    shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// Parameters of one task: (its own parameters besides the head, head). For separate
/// models the first is the task's own encoder and pooler.
pub fn task_param_count(c: &BertConfig, method: &Method, task: &TaskSpec) -> (usize, usize) {
    let total = count(&task_param_shapes(c, method, task));
    let head = task.num_labels * (c.hidden_size + 1);
    let own_encoder = if method.imp().own_encoder() { bert_param_count(c) } else { 0 };
    (total - head + own_encoder, head)
}

/// Every parameter of the model: the shared encoder and pooler (none for separate models,
/// which count one per task), plus each task's.
pub fn param_count(c: &BertConfig, method: &Method, tasks: &[TaskSpec]) -> usize {
    let shared = if method.imp().own_encoder() { 0 } else { bert_param_count(c) };
    let per_task = |t| {
        let (own, head) = task_param_count(c, method, t);
        own + head
    };
    shared + tasks.iter().map(per_task).sum::<usize>()
}

/// A seed for each task from its name, so that tasks initialised from one seed differ.
fn task_seed(seed: u32, task: &str) -> u32 {
    task.bytes().fold(seed, |s, b| crate::contract::rng::pcg_hash(s ^ b as u32))
}

/// Random task parameters as [`super::random_weights`] draws BERT's: weights uniform with
/// standard deviation 0.02, biases 0, LayerNorm γ = 1 (and β = 0).
pub fn random_task_weights(c: &BertConfig, method: &Method, task: &TaskSpec, seed: u32) -> Weights {
    let seed = task_seed(seed, &task.name);
    task_param_shapes(c, method, task)
        .into_iter()
        .enumerate()
        .map(|(index, (name, shape))| {
            let len = shape.iter().product();
            let data = if name.ends_with("LayerNorm.weight") {
                vec![1.0; len]
            } else if name.ends_with(".bias") {
                vec![0.0; len]
            } else {
                // Uniform on [-a, a] has standard deviation a/√3.
                crate::contract::random_vec(len, seed.wrapping_add(index as u32 * 7919), 0.02 * 3f32.sqrt())
            };
            (name, HostTensor::new(&shape, data))
        })
        .collect()
}

// ----------------------------------------------------------------------------------------
// Parameters on the GPU

/// One task's parameters (or gradients): the head by role, and every tensor by name in
/// `task_param_shapes` order.
#[derive(Clone)]
pub struct TaskTensors {
    pub head: Linear,
    pub named: Vec<(String, Tensor)>,
}

impl TaskTensors {
    fn new(task: &TaskSpec, named: Vec<(String, Tensor)>) -> TaskTensors {
        let head = ByName::new(&named).linear(&format!("{}head", task_prefix(&task.name)));
        TaskTensors { head, named }
    }

    /// Copies every tensor back to the host, by name.
    pub fn download(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        download_named(gpu, &self.named)
    }
}

/// One task on the GPU: its parameters, their gradients (none for inference), and its
/// method's terms over both.
pub struct TaskModule {
    pub spec: TaskSpec,
    pub params: TaskTensors,
    pub grads: Option<TaskTensors>,
    terms: Box<dyn TaskTerms>,
}

impl TaskModule {
    pub fn grads(&self) -> Result<&TaskTensors, GpuError> {
        method::grads_of(&self.grads, &self.spec.name)
    }
}

// ----------------------------------------------------------------------------------------
// Activations

/// Every buffer a multi-task step of one (batch, seq) bucket uses: the encoder's, the
/// method's and the heads'.
pub struct TaskActivations {
    /// What the buffers are for: the model's method and its widest head.
    pub method: Method,
    pub max_labels: usize,
    pub encoder: Activations,
    pub terms: MethodActs,
    pub head: HeadActs<Tensor>,
    pub all: Vec<Tensor>,
}

/// The head's buffers and what every method shares; logits are [B, max labels] and viewed
/// as [B, k] for a task of k.
pub struct HeadActs<T> {
    /// A term before it is added into a layer [rows, H].
    pub term: T,
    /// Dropout_head(pooled) [B, H], and (backward only) the gradients of it and of pooled.
    pub input: T,
    pub d_input: T,
    pub d_pooled: T,
    pub logits: T,
    pub d_logits: T,
    /// The step's loss [1].
    pub loss: T,
}

fn build_head<T>(
    c: &BertConfig,
    max_labels: usize,
    b: Bucket,
    alloc: Alloc<T>,
) -> Result<HeadActs<T>, GpuError> {
    let (h, bb) = (c.hidden_size, if b.training { b.batch } else { 0 });
    let mut a = |name: &str, shape: &[usize]| alloc(format!("tasks.{name}"), shape, F32);
    Ok(HeadActs {
        term: a("scratch.term", &[b.rows(), h])?,
        input: a("head.input", &[bb, h])?,
        d_input: a("head.d_input", &[bb, h])?,
        d_pooled: a("head.d_pooled", &[bb, h])?,
        logits: a("head.logits", &[b.batch, max_labels])?,
        d_logits: a("head.d_logits", &[bb, max_labels])?,
        loss: a("head.loss", &[if b.training { 1 } else { 0 }])?,
    })
}

impl TaskActivations {
    /// (name, shape) of every buffer the terms and heads add to the encoder's
    /// (`Activations::plan`) for training, for a model whose widest head has `max_labels`.
    pub fn plan(
        c: &BertConfig,
        method: &Method,
        max_labels: usize,
        batch: usize,
        seq: usize,
    ) -> Vec<Planned> {
        TaskActivations::plan_for(c, method, max_labels, Bucket { batch, seq, training: true })
    }

    /// `plan` for training or inference.
    pub fn plan_for(c: &BertConfig, method: &Method, max_labels: usize, bucket: Bucket) -> Vec<Planned> {
        let mut list = method.imp().plan(c, bucket);
        list.extend(plan_of(|alloc| build_head(c, max_labels, bucket, alloc)));
        list
    }

    pub fn batch(&self) -> usize {
        self.encoder.batch
    }

    /// Bytes of GPU memory the buffers hold, the encoder's included.
    pub fn bytes(&self) -> u64 {
        self.encoder.bytes() + self.all.iter().map(|t| t.buffer.size()).sum::<u64>()
    }
}

// ----------------------------------------------------------------------------------------
// The step

/// The labels and per-example weights of one batch on the GPU, both [B]: class ids (u32)
/// or regression targets (f32, score / 5) in the same buffer, as the task has it.
pub struct HeadInputs {
    pub labels: Tensor,
    pub weights: Tensor,
    /// What `labels` holds: None before the first write, else whether it is regression
    /// targets (the buffer itself has no type).
    pub regression: Option<bool>,
    /// [1]: what the loss gradient is multiplied by: 1, or the optimizer's loss scale
    /// (a view of its buffer, so a scale changed on the GPU needs no copy).
    pub loss_scale: Tensor,
}

impl HeadInputs {
    pub fn new(gpu: &Gpu, batch: usize) -> Result<HeadInputs, GpuError> {
        Ok(HeadInputs {
            labels: gpu.zeros("head.labels", &[batch])?,
            weights: gpu.zeros("head.weights", &[batch])?,
            regression: None,
            loss_scale: gpu.upload("head.loss_scale", &[1], &[1.0f32])?,
        })
    }

    /// Writes a batch's targets and example weights (0 masks an example).
    pub fn write(&mut self, gpu: &Gpu, targets: &Targets, weights: &[f32]) -> Result<(), GpuError> {
        gpu.write(&self.labels, &targets.words())?;
        gpu.write(&self.weights, weights)?;
        self.regression = Some(matches!(targets, Targets::Scores(_)));
        Ok(())
    }

    pub fn upload(gpu: &Gpu, targets: &Targets, weights: &[f32]) -> Result<HeadInputs, GpuError> {
        let mut inputs = HeadInputs::new(gpu, targets.len())?;
        inputs.write(gpu, targets, weights)?;
        Ok(inputs)
    }
}

/// The shared encoder and every task's terms and head.
pub struct MultiTaskModel {
    pub bert: Bert,
    pub method: Method,
    pub tasks: Vec<TaskModule>,
}

impl MultiTaskModel {
    /// Uploads the encoder's weights and each task's (named as `task_param_shapes`; extra
    /// entries are ignored) and allocates zeroed gradients. An error names any missing or
    /// mis-shaped tensor, or a method whose sizes do not fit. [`Method::Separate`] is an
    /// error: separate models are trained as one single-task `Shared` model per task.
    pub fn upload(
        gpu: &Gpu,
        config: &BertConfig,
        method: Method,
        shared: &Weights,
        tasks: &[(TaskSpec, &Weights)],
    ) -> Result<MultiTaskModel, ModelError> {
        MultiTaskModel::build(gpu, config, method, shared, tasks, true)
    }

    /// `upload` for inference: no gradients, and buckets hold only what a forward needs.
    pub fn upload_inference(
        gpu: &Gpu,
        config: &BertConfig,
        method: Method,
        shared: &Weights,
        tasks: &[(TaskSpec, &Weights)],
    ) -> Result<MultiTaskModel, ModelError> {
        MultiTaskModel::build(gpu, config, method, shared, tasks, false)
    }

    fn build(
        gpu: &Gpu,
        config: &BertConfig,
        method: Method,
        shared: &Weights,
        tasks: &[(TaskSpec, &Weights)],
        training: bool,
    ) -> Result<MultiTaskModel, ModelError> {
        let imp = method.imp();
        if imp.own_encoder() {
            let detail = "it is not one multi-task model: train each task as its own single-task 'shared' \
                          model (the trainer does that)";
            return Err(ModelError::method(method.name(), detail));
        }
        method.check_for(config).map_err(|detail| ModelError::method(method.name(), detail))?;
        let bert = if training {
            Bert::upload(gpu, config, shared)?
        } else {
            Bert::upload_inference(gpu, config, shared)?
        };
        let mut modules = Vec::with_capacity(tasks.len());
        for (spec, weights) in tasks {
            if spec.num_labels == 0 || modules.iter().any(|m: &TaskModule| m.spec.name == spec.name) {
                let detail = format!("{} labels: duplicate or without outputs", spec.num_labels);
                return Err(ModelError::task(&spec.name, detail));
            }
            let shapes = task_param_shapes(config, &method, spec);
            let params = make_named(shapes.clone(), |name, shape| upload_named(gpu, weights, name, shape))?;
            let grads = match training {
                true => Some(make_named(shapes, |name, shape| gpu.zeros(&format!("grad {name}"), shape))?),
                false => None,
            };
            let prefix = task_prefix(&spec.name);
            let grads_by_name = grads.as_deref().map(ByName::new);
            let terms = imp.terms(config, &prefix, &ByName::new(&params), grads_by_name.as_ref());
            let (params, grads) = (TaskTensors::new(spec, params), grads.map(|g| TaskTensors::new(spec, g)));
            modules.push(TaskModule { spec: spec.clone(), params, grads, terms });
        }
        Ok(MultiTaskModel { bert, method, tasks: modules })
    }

    pub fn task_index(&self, name: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t.spec.name == name)
    }

    fn max_labels(&self) -> usize {
        self.tasks.iter().map(|t| t.spec.num_labels).max().unwrap_or(1)
    }

    /// The buffers of one (batch, seq) bucket, for every task (for training when the model
    /// has gradients).
    pub fn activations(&self, gpu: &Gpu, batch: usize, seq: usize) -> Result<TaskActivations, GpuError> {
        let c = &self.bert.config;
        let bucket = Bucket { batch, seq, training: self.bert.training() };
        let encoder = self.bert.activations(gpu, batch, seq)?;
        let imp = self.method.imp();
        let ((terms, head), all) = allocate(gpu, |alloc| {
            Ok((imp.activations(c, bucket, alloc)?, build_head(c, self.max_labels(), bucket, alloc)?))
        })?;
        Ok(TaskActivations { method: self.method, max_labels: self.max_labels(), encoder, terms, head, all })
    }

    fn task(&self, op: &str, task: usize) -> Result<&TaskModule, GpuError> {
        self.tasks.get(task).ok_or_else(|| shape_error(op, format!("task {task} of {}", self.tasks.len())))
    }

    /// Task `task`, after checking that `acts` were made for this model (the encoder's
    /// bucket is checked by `Bert`).
    fn task_for(&self, op: &str, acts: &TaskActivations, task: usize) -> Result<&TaskModule, GpuError> {
        let module = self.task(op, task)?;
        if acts.method != self.method || acts.max_labels < module.spec.num_labels {
            let detail = format!(
                "activations for {:?} with {} labels, model {:?} task '{}' with {}",
                acts.method, acts.max_labels, self.method, module.spec.name, module.spec.num_labels
            );
            return Err(shape_error(op, detail));
        }
        Ok(module)
    }

    /// Task `task`'s logits ([B, k] view of `acts.head.logits`).
    pub fn logits(&self, acts: &TaskActivations, task: usize) -> Result<Tensor, GpuError> {
        let k = self.task("MultiTaskModel::logits", task)?.spec.num_labels;
        Ok(acts.head.logits.view(&[acts.batch(), k]))
    }

    fn head_dropout(&self, key: Option<DropoutKey>) -> Option<DropoutSpec> {
        DropoutSpec::at(key, self.bert.config.hidden_dropout_prob, SITE_HEAD)
    }

    /// The forward of task `task` on the batch in `inputs`: the encoder with the task's
    /// terms, then its head; the logits are in [`MultiTaskModel::logits`] (for regression,
    /// [B, 1] predictions of score / 5).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        acts: &TaskActivations,
        inputs: &BatchInputs,
        task: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let module = self.task_for("MultiTaskModel::forward", acts, task)?;
        let hook = module.terms.hook(&self.bert.config, acts)?;
        self.bert.forward_with(rec, &acts.encoder, inputs, dropout, hook.as_ref())?;
        let (head, b, drop) = (&acts.head, acts.batch(), self.head_dropout(dropout));
        dropout_finish(rec, &acts.encoder.pooled, &head.input, drop)?;
        let input = dropout_target(&acts.encoder.pooled, &head.input, drop);
        module.params.head.forward(rec, b, input, &self.logits(acts, task)?)
    }

    /// One training step of task `task`: `forward`, the loss against `labels` into
    /// `acts.head.loss` (returned), and the backward, which overwrites the encoder's
    /// gradients and task `task`'s (no other task's).
    pub fn forward_backward<'a>(
        &self,
        rec: &mut Recorder,
        acts: &'a TaskActivations,
        inputs: &BatchInputs,
        labels: &HeadInputs,
        task: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<&'a Tensor, GpuError> {
        let op = "MultiTaskModel::forward_backward";
        let module = self.task_for(op, acts, task)?;
        if labels.regression != Some(module.spec.is_regression()) {
            let detail = format!(
                "labels {:?} for task '{}'",
                labels.regression.map(|r| if r { "scores" } else { "classes" }),
                module.spec.name
            );
            return Err(shape_error(op, detail));
        }
        let grads = module.grads()?;
        self.forward(rec, acts, inputs, task, dropout)?;
        let (head, b, k) = (&acts.head, acts.batch(), module.spec.num_labels);
        let (logits, d_logits) = (self.logits(acts, task)?, head.d_logits.view(&[b, k]));
        let loss_of = if module.spec.is_regression() { loss::mse } else { loss::cross_entropy };
        loss_of(rec, &logits, &labels.labels, &labels.weights, &head.loss, &d_logits, &labels.loss_scale)?;
        let drop = self.head_dropout(dropout);
        let input = dropout_target(&acts.encoder.pooled, &head.input, drop);
        let to_input = Some((&head.d_input, Epilogue::None));
        let head_grads = (&grads.head, GradMode::Overwrite);
        module.params.head.backward(rec, b, input, &d_logits, head_grads, to_input, &acts.encoder.colsum)?;
        let d_pooled = dropout_backward(rec, &head.d_input, &head.d_pooled, drop)?;
        let hook = module.terms.hook(&self.bert.config, acts)?;
        self.bert.backward_with(rec, &acts.encoder, inputs, None, d_pooled, dropout, hook.as_ref())?;
        Ok(&head.loss)
    }

    /// Task `task`'s parameters, by name.
    pub fn download_task_weights(&self, gpu: &Gpu, task: usize) -> Result<Weights, GpuError> {
        self.task("download_task_weights", task)?.params.download(gpu)
    }

    /// Task `task`'s gradients, by parameter name.
    pub fn download_task_grads(&self, gpu: &Gpu, task: usize) -> Result<Weights, GpuError> {
        self.task("download_task_grads", task)?.grads()?.download(gpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(method: &Method) -> f64 {
        let c = BertConfig::base();
        param_count(&c, method, &TaskSpec::glue()) as f64 / bert_param_count(&c) as f64
    }

    /// The paper's accounting (bert-pals.md): BERT-base with pooler 109,482,240; the eight
    /// GLUE heads 12,304; PALs-204 1,819,836 per task (without its head), 1.133× in all.
    #[test]
    fn parameter_counts_match_the_paper() {
        let c = BertConfig::base();
        let glue = TaskSpec::glue();
        let method = |name| Method::default_for(name, &c).unwrap();
        assert_eq!(method("pals"), Method::Pals { dim: 204, heads: 6 });
        assert_eq!(method("low-rank"), Method::LowRank { rank: 100 });
        assert_eq!(method("adapters"), Method::Adapters { size: 50 });
        let heads: usize = glue.iter().map(|t| task_param_count(&c, &Method::Shared, t).1).sum();
        assert_eq!(heads, 12_304);
        for task in &glue {
            assert_eq!(task_param_count(&c, &method("pals"), task).0, 1_819_836, "{}", task.name);
            assert_eq!(task_param_count(&c, &method("shared"), task).0, 0);
        }
        assert_eq!(param_count(&c, &Method::Shared, &glue), 109_482_240 + 12_304);
        let pals = ratio(&method("pals"));
        assert!((pals - 1.133).abs() < 0.0005, "PALs {pals}");
        let low_rank = ratio(&method("low-rank"));
        assert!((low_rank - 1.136).abs() < 0.0005, "low-rank {low_rank}");
        let adapters = ratio(&method("adapters"));
        assert!((adapters - 1.136).abs() < 0.0005, "adapters {adapters}");
        assert!((ratio(&method("shared")) - 1.0001).abs() < 0.0001);
        // Top-attn: down 768·204 + 204, six blocks of 4·(204² + 204) + 2·204, up 204·768 + 768.
        let top = method("top-attn");
        assert_eq!(top, Method::TopAttn { dim: 204, heads: 12, blocks: 6 });
        for task in &glue {
            assert_eq!(task_param_count(&c, &top, task).0, 1_320_444, "{}", task.name);
        }
        assert_eq!(param_count(&c, &top, &glue), 109_482_240 + 12_304 + 8 * 1_320_444);
        let top = ratio(&top);
        assert!((top - 1.0966).abs() < 0.00005, "top-attn {top}");
        // Separate: eight encoders with poolers, and the heads.
        let separate = method("separate");
        assert_eq!(task_param_count(&c, &separate, &glue[0]), (109_482_240, 1538));
        assert_eq!(param_count(&c, &separate, &glue), 8 * 109_482_240 + 12_304);
        let separate = ratio(&separate);
        assert!((separate - 8.0).abs() < 0.0002, "separate {separate}");
    }

    #[test]
    fn sizes_scale_with_the_width() {
        let minilm = BertConfig::minilm();
        assert_eq!(Method::default_for("pals", &minilm).unwrap(), Method::Pals { dim: 102, heads: 6 });
        assert_eq!(Method::default_for("low-rank", &minilm).unwrap(), Method::LowRank { rank: 50 });
        assert_eq!(Method::default_for("adapters", &minilm).unwrap(), Method::Adapters { size: 25 });
        // 204·384/768 = 102 = 12·8.5 heads of 12: ties round up, to 108.
        assert_eq!(
            Method::default_for("top-attn", &minilm).unwrap(),
            Method::TopAttn { dim: 108, heads: 12, blocks: 6 }
        );
        let tiny = BertConfig::tiny(2, 32, 4);
        assert_eq!(Method::default_for("pals", &tiny).unwrap(), Method::Pals { dim: 6, heads: 6 });
        assert_eq!(
            Method::default_for("top-attn", &tiny).unwrap(),
            Method::TopAttn { dim: 12, heads: 12, blocks: 6 }
        );
        assert!(Method::default_for("top", &tiny).is_err());
        assert!(Method::TopAttn { dim: 18, heads: 12, blocks: 6 }.check().is_err());
        assert!(Method::TopAttn { dim: 12, heads: 12, blocks: 0 }.check().is_err());
        // 6 blocks take 12 virtual layers of dropout sites: 50 layers leave room, 52 do not.
        let top = Method::default_for("top-attn", &tiny).unwrap();
        assert!(top.check_for(&BertConfig::tiny(50, 32, 4)).is_ok());
        assert!(top.check_for(&BertConfig::tiny(52, 32, 4)).is_err());
        assert!(Method::Pals { dim: 10, heads: 6 }.check().is_err());
        assert!(Method::Pals { dim: 6 * 129, heads: 6 }.check().is_err());
        assert!(Method::LowRank { rank: 0 }.check().is_err());
    }

    #[test]
    fn names_are_per_task_and_initialisation_is_berts() {
        let c = BertConfig::tiny(2, 32, 4);
        let method = Method::Pals { dim: 12, heads: 6 };
        let sts = TaskSpec::new("STS-B", 1);
        let shapes = task_param_shapes(&c, &method, &sts);
        assert!(shapes.iter().all(|(n, _)| n.starts_with("tasks.STS-B.")));
        assert!(shapes.contains(&("tasks.STS-B.pal.layer.1.value.weight".into(), vec![12, 12])));
        assert!(shapes.contains(&("tasks.STS-B.head.weight".into(), vec![1, 32])));
        let a = random_task_weights(&c, &method, &sts, 5);
        let b = random_task_weights(&c, &method, &TaskSpec::new("RTE", 1), 5);
        let enc = "pal.encoder.weight";
        assert_ne!(a[&format!("tasks.STS-B.{enc}")].data, b[&format!("tasks.RTE.{enc}")].data);
        assert!(a["tasks.STS-B.pal.decoder.bias"].data.iter().all(|&v| v == 0.0));
        let w = &a[&format!("tasks.STS-B.{enc}")].data;
        let std = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.004, "std {std}");
    }

    #[test]
    fn top_attn_names_and_initialisation() {
        let c = BertConfig::tiny(2, 32, 4);
        let method = Method::TopAttn { dim: 12, heads: 4, blocks: 2 };
        let task = TaskSpec::new("QQP", 2);
        let shapes = task_param_shapes(&c, &method, &task);
        assert_eq!(shapes.len(), 4 + 2 * 10 + 2);
        assert_eq!(shapes[0], ("tasks.QQP.top.down.weight".into(), vec![12, 32]));
        assert!(shapes.contains(&("tasks.QQP.top.block.1.output.weight".into(), vec![12, 12])));
        assert!(shapes.contains(&("tasks.QQP.top.block.0.LayerNorm.bias".into(), vec![12])));
        assert!(shapes.contains(&("tasks.QQP.top.up.weight".into(), vec![32, 12])));
        let w = random_task_weights(&c, &method, &task, 3);
        assert!(w["tasks.QQP.top.block.1.LayerNorm.weight"].data.iter().all(|&v| v == 1.0));
        assert!(w["tasks.QQP.top.block.1.LayerNorm.bias"].data.iter().all(|&v| v == 0.0));
        assert!(w["tasks.QQP.top.block.1.query.weight"].data.iter().any(|&v| v != 0.0));
        // Separate models have only their heads here: the rest is a single-task model's.
        let separate = task_param_shapes(&c, &Method::Separate, &task);
        assert_eq!(separate, task_param_shapes(&c, &Method::Shared, &task));
        assert_eq!(Method::default_for("separate", &c).unwrap().name(), "separate");
    }

    #[test]
    fn regression_targets_are_scaled() {
        let words = Targets::Scores(vec![5.0, 2.5]).words();
        assert_eq!(words.iter().map(|&w| f32::from_bits(w)).collect::<Vec<_>>(), vec![1.0, 0.5]);
        assert_eq!(Targets::Classes(vec![2, 0]).words(), vec![2, 0]);
    }
}
