//! Task-specific modules and heads for multi-task BERT (Stickland & Murray 2019, "BERT and
//! PALs"), on the GPU: one shared encoder, and per task a few parameters inside every layer
//! and a classifier head. The CPU twin is src/reference/tasks.rs.
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
//! The original top-attn code (Bert-n-Pals, `config.top`) is the same: down, six
//! `BERTAttention(config, 12)` blocks, up, no activation. Its block LayerNorms start from
//! N(0, 0.02) for γ and β, close to zero; we start them as BERT's, γ = 1 and β = 0. The
//! width P scales 204 (at hidden 768) with the model, rounded to a multiple of the 12 heads,
//! ties up: 108 = 12·9 at hidden 384 (204·384/768 = 102 = 12·8.5), 12 at hidden 32.
//! Dropout: block i draws its attention probabilities at site(L + 2i, TaskSpecific) and its
//! output at site(L + 2i + 1, TaskSpecific), virtual layers past the encoder's L (see
//! [`top_dropout_sites`]); with hidden_dropout_prob and attention_probs_dropout_prob.
//! Head: logits = Dropout_head(pooled)·Wᵀ + b, W [k, H] (the pooler is shared); dropout
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

use super::bert::{
    Activations, Alloc, BatchInputs, Bert, LayerHook, LinearGrads, allocate, copy, dropout_backward,
    dropout_spec, linear, linear_backward, plan_of, shape_error, stats,
};
use super::{
    BertConfig, DropoutKey, HostTensor, SITE_HEAD, Site, Weights, param_count as bert_param_count, site,
};
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::kernels::attention::{self, AttentionShape, MAX_HEAD_DIM};
use crate::kernels::elementwise::{self, DropoutSpec};
use crate::kernels::layernorm::{self, LayerNorm, LayerNormGrads, LayerNormScratch};
use crate::kernels::loss;
use crate::kernels::matmul::{Epilogue, Matmul, matmul};
use crate::kernels::reduce;
use std::collections::BTreeMap;

/// The paper's sizes for BERT-base (hidden 768); other widths scale them.
const BASE_HIDDEN: usize = 768;
pub const PAL_DIM_BASE: usize = 204;
pub const PAL_HEADS: usize = 6;
pub const LOW_RANK_BASE: usize = 100;
pub const ADAPTER_BASE: usize = 50;
pub const TOP_DIM_BASE: usize = 204;
pub const TOP_HEADS: usize = 12;
pub const TOP_BLOCKS: usize = 6;

/// Regression targets are score / 5, as in the original code: STS-B's 0–5 scale to 0–1.
pub const REGRESSION_SCALE: f32 = 5.0;

/// How the tasks share the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Only the heads are task-specific.
    Shared,
    /// Projected attention layers of width `dim` with `heads` heads.
    Pals { dim: usize, heads: usize },
    /// A rank-`rank` bottleneck per layer, inside LN2.
    LowRank { rank: usize },
    /// Two Houlsby-style adapters of width `size` per layer.
    Adapters { size: usize },
    /// Top projected attention: `blocks` attention blocks of width `dim` with `heads` heads
    /// after the last layer, replacing the sequence output.
    TopAttn { dim: usize, heads: usize, blocks: usize },
    /// The paper's "BERT-base 8×" baseline: a full encoder per task and no task-specific
    /// terms. Not a multi-task model: the trainer trains each task as its own single-task
    /// [`Method::Shared`] model, and [`MultiTaskModel::upload`] refuses it; it exists here
    /// for its name and its parameter count.
    Separate,
}

/// round(hidden · base / 768) to a multiple of `multiple`, at least `multiple`.
fn scaled(hidden: usize, base: usize, multiple: usize) -> usize {
    let units = (hidden * base) as f64 / (BASE_HIDDEN * multiple) as f64;
    (units.round() as usize).max(1) * multiple
}

impl Method {
    pub const NAMES: [&str; 6] = ["shared", "pals", "low-rank", "adapters", "top-attn", "separate"];

    /// The method called `name` (one of [`Method::NAMES`]) with the paper's sizes scaled to
    /// the model's width: PALs 204 (6 heads of 34) at hidden 768, 102 (6 × 17) at 384;
    /// low-rank 100 and adapters 50 at 768; top-attn 6 blocks of 204 (12 heads of 17) at
    /// 768, 108 (12 × 9) at 384.
    pub fn default_for(name: &str, c: &BertConfig) -> Result<Method, String> {
        let h = c.hidden_size;
        match name {
            "shared" => Ok(Method::Shared),
            "pals" => Ok(Method::Pals { dim: scaled(h, PAL_DIM_BASE, PAL_HEADS), heads: PAL_HEADS }),
            "low-rank" => Ok(Method::LowRank { rank: scaled(h, LOW_RANK_BASE, 1) }),
            "adapters" => Ok(Method::Adapters { size: scaled(h, ADAPTER_BASE, 1) }),
            "top-attn" => Ok(Method::TopAttn {
                dim: scaled(h, TOP_DIM_BASE, TOP_HEADS),
                heads: TOP_HEADS,
                blocks: TOP_BLOCKS,
            }),
            "separate" => Ok(Method::Separate),
            _ => Err(format!("unknown method '{name}': expected one of {}", Method::NAMES.join(", "))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Shared => "shared",
            Method::Pals { .. } => "pals",
            Method::LowRank { .. } => "low-rank",
            Method::Adapters { .. } => "adapters",
            Method::TopAttn { .. } => "top-attn",
            Method::Separate => "separate",
        }
    }

    /// An error unless the sizes are usable: non-zero, attention heads dividing their
    /// width (PALs, top-attn), and a head no wider than the attention kernel allows.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Method::Pals { dim, heads } => check_heads("PAL", dim, heads),
            Method::TopAttn { blocks: 0, .. } => Err("top-attn needs at least one block".into()),
            Method::TopAttn { dim, heads, .. } => check_heads("top-attn", dim, heads),
            Method::LowRank { rank: 0 } | Method::Adapters { size: 0 } => {
                Err(format!("{} needs a non-zero width", self.name()))
            }
            _ => Ok(()),
        }
    }

    /// `check`, and for top-attn that every dropout site fits below the head's.
    pub fn check_for(&self, c: &BertConfig) -> Result<(), String> {
        self.check()?;
        if let Method::TopAttn { blocks, .. } = *self {
            let last = top_dropout_sites(c, blocks - 1).1;
            if last >= SITE_HEAD {
                let detail = format!("{blocks} blocks after {} layers", c.num_hidden_layers);
                return Err(format!("top-attn has more dropout sites than a step has: {detail}"));
            }
        }
        Ok(())
    }
}

fn check_heads(what: &str, dim: usize, heads: usize) -> Result<(), String> {
    if heads == 0 || dim == 0 || !dim.is_multiple_of(heads) {
        return Err(format!("{what} width {dim} is not a positive multiple of {heads} heads"));
    }
    if dim / heads > MAX_HEAD_DIM {
        return Err(format!("{what} head width {} exceeds {MAX_HEAD_DIM}", dim / heads));
    }
    Ok(())
}

/// The dropout sites of top-attn block `block`: (attention probabilities, block output),
/// the task-specific sites of virtual layers L + 2·block and L + 2·block + 1.
pub fn top_dropout_sites(c: &BertConfig, block: usize) -> (u32, u32) {
    let layer = c.num_hidden_layers + 2 * block;
    (site(layer, Site::TaskSpecific), site(layer + 1, Site::TaskSpecific))
}

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

/// A Linear's two parameters: weight [out, in] and bias [out].
fn linear_shapes(name: String, out: usize, inp: usize) -> [(String, Vec<usize>); 2] {
    [(format!("{name}.weight"), vec![out, inp]), (format!("{name}.bias"), vec![out])]
}

/// Every task-specific parameter of `task` with its shape: the layer terms, then the head.
pub fn task_param_shapes(c: &BertConfig, method: &Method, task: &TaskSpec) -> Vec<(String, Vec<usize>)> {
    let (h, p) = (c.hidden_size, task_prefix(&task.name));
    let mut shapes = Vec::new();
    let layers = 0..c.num_hidden_layers;
    match *method {
        Method::Shared | Method::Separate => {}
        Method::Pals { dim, .. } => {
            shapes.extend(linear_shapes(format!("{p}pal.encoder"), dim, h));
            shapes.extend(linear_shapes(format!("{p}pal.decoder"), h, dim));
            for l in layers {
                for which in ["query", "key", "value"] {
                    shapes.extend(linear_shapes(format!("{p}pal.layer.{l}.{which}"), dim, dim));
                }
            }
        }
        Method::LowRank { rank } => {
            for l in layers {
                shapes.extend(linear_shapes(format!("{p}low_rank.layer.{l}.encoder"), rank, h));
                shapes.extend(linear_shapes(format!("{p}low_rank.layer.{l}.decoder"), h, rank));
            }
        }
        Method::Adapters { size } => {
            for l in layers {
                for site in ["attention", "ffn"] {
                    shapes.extend(linear_shapes(format!("{p}adapter.layer.{l}.{site}.down"), size, h));
                    shapes.extend(linear_shapes(format!("{p}adapter.layer.{l}.{site}.up"), h, size));
                }
            }
        }
        Method::TopAttn { dim, blocks, .. } => {
            shapes.extend(linear_shapes(format!("{p}top.down"), dim, h));
            for i in 0..blocks {
                for which in ["query", "key", "value", "output"] {
                    shapes.extend(linear_shapes(format!("{p}top.block.{i}.{which}"), dim, dim));
                }
                let norm = format!("{p}top.block.{i}.LayerNorm");
                shapes.extend([(format!("{norm}.weight"), vec![dim]), (format!("{norm}.bias"), vec![dim])]);
            }
            shapes.extend(linear_shapes(format!("{p}top.up"), h, dim));
        }
    }
    shapes.extend(linear_shapes(format!("{p}head"), task.num_labels, h));
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
    let own_encoder = if *method == Method::Separate { bert_param_count(c) } else { 0 };
    (total - head + own_encoder, head)
}

/// Every parameter of the model: the shared encoder and pooler (none for separate models,
/// which count one per task), plus each task's.
pub fn param_count(c: &BertConfig, method: &Method, tasks: &[TaskSpec]) -> usize {
    let shared = if *method == Method::Separate { 0 } else { bert_param_count(c) };
    let per_task = |t| {
        let (own, head) = task_param_count(c, method, t);
        own + head
    };
    shared + tasks.iter().map(per_task).sum::<usize>()
}

/// A seed for each task from its name, so that tasks initialised from one seed differ.
fn task_seed(seed: u32, task: &str) -> u32 {
    task.bytes().fold(seed, |s, b| crate::reference::rng::pcg_hash(s ^ b as u32))
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
                crate::reference::random_vec(len, seed.wrapping_add(index as u32 * 7919), 0.02 * 3f32.sqrt())
            };
            (name, HostTensor::new(&shape, data))
        })
        .collect()
}

// ----------------------------------------------------------------------------------------
// Parameters on the GPU

/// A Linear's weight [out, in] and bias [out] (or their gradients).
#[derive(Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Tensor,
}

/// x ↦ up(GELU(down(x))): a low-rank layer or an adapter.
#[derive(Clone)]
pub struct Bottleneck {
    pub down: Linear,
    pub up: Linear,
}

/// One top-attn block: [query, key, value], the output dense, and the LayerNorm's γ (in
/// `norm.w`) and β (in `norm.b`).
#[derive(Clone)]
pub struct TopBlock {
    pub qkv: [Linear; 3],
    pub output: Linear,
    pub norm: Linear,
}

/// A method's terms inside the layers, by role.
// One per task, made once: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Terms {
    Shared,
    /// V^E, V^D and per layer [query, key, value].
    Pals {
        encoder: Linear,
        decoder: Linear,
        layers: Vec<[Linear; 3]>,
    },
    /// Per layer V^E (down) and V^D (up).
    LowRank {
        layers: Vec<Bottleneck>,
    },
    /// Per layer [attention, ffn] adapters.
    Adapters {
        layers: Vec<[Bottleneck; 2]>,
    },
    /// The down- and up-projections and the blocks between them.
    Top {
        down: Linear,
        up: Linear,
        blocks: Vec<TopBlock>,
    },
}

/// One task's parameters (or gradients): by role, and by name in `task_param_shapes` order.
#[derive(Clone)]
pub struct TaskTensors {
    pub head: Linear,
    pub terms: Terms,
    pub named: Vec<(String, Tensor)>,
}

impl TaskTensors {
    fn new(
        c: &BertConfig,
        method: &Method,
        task: &TaskSpec,
        mut make: impl FnMut(&str, &[usize]) -> Result<Tensor, GpuError>,
    ) -> Result<TaskTensors, GpuError> {
        let named = task_param_shapes(c, method, task)
            .into_iter()
            .map(|(name, shape)| Ok((name.clone(), make(&name, &shape)?)))
            .collect::<Result<Vec<_>, GpuError>>()?;
        let by_name: BTreeMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let prefix = task_prefix(&task.name);
        let get = |name: &str| -> Linear {
            let tensor = |suffix: &str| {
                let full = format!("{prefix}{name}.{suffix}");
                by_name.get(full.as_str()).map(|t| (*t).clone()).expect("name from task_param_shapes")
            };
            Linear { w: tensor("weight"), b: tensor("bias") }
        };
        let layers = 0..c.num_hidden_layers;
        let terms = match *method {
            Method::Shared | Method::Separate => Terms::Shared,
            Method::Pals { .. } => Terms::Pals {
                encoder: get("pal.encoder"),
                decoder: get("pal.decoder"),
                layers: layers
                    .map(|l| ["query", "key", "value"].map(|w| get(&format!("pal.layer.{l}.{w}"))))
                    .collect(),
            },
            Method::LowRank { .. } => Terms::LowRank {
                layers: layers
                    .map(|l| Bottleneck {
                        down: get(&format!("low_rank.layer.{l}.encoder")),
                        up: get(&format!("low_rank.layer.{l}.decoder")),
                    })
                    .collect(),
            },
            Method::Adapters { .. } => Terms::Adapters {
                layers: layers
                    .map(|l| {
                        ["attention", "ffn"].map(|site| Bottleneck {
                            down: get(&format!("adapter.layer.{l}.{site}.down")),
                            up: get(&format!("adapter.layer.{l}.{site}.up")),
                        })
                    })
                    .collect(),
            },
            Method::TopAttn { blocks, .. } => Terms::Top {
                down: get("top.down"),
                up: get("top.up"),
                blocks: (0..blocks)
                    .map(|i| {
                        let get = |which: &str| get(&format!("top.block.{i}.{which}"));
                        TopBlock {
                            qkv: ["query", "key", "value"].map(get),
                            output: get("output"),
                            norm: get("LayerNorm"),
                        }
                    })
                    .collect(),
            },
        };
        Ok(TaskTensors { head: get("head"), terms, named })
    }

    /// Copies every tensor back to the host, by name.
    pub fn download(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        self.named
            .iter()
            .map(|(name, t)| Ok((name.clone(), HostTensor::new(&t.shape, gpu.read::<f32>(t)?))))
            .collect()
    }
}

/// One task on the GPU: its parameters and their gradients.
pub struct TaskModule {
    pub spec: TaskSpec,
    pub params: TaskTensors,
    pub grads: TaskTensors,
}

// ----------------------------------------------------------------------------------------
// Activations

/// What one PAL layer's forward keeps for its backward (rows = B·S).
pub struct PalLayerActs<T> {
    /// V^E·h + b_E [rows, P] = [B, S, heads, P/heads] once projected.
    pub enc: T,
    pub q: T,
    pub k: T,
    pub v: T,
    /// The attention output [rows, P] and its log-sum-exps [B, heads, S].
    pub ctx: T,
    pub lse: T,
    /// V^D·ctx + b_D [rows, H], the GELU's input.
    pub pre: T,
}

/// What one top-attn block's forward keeps for its backward (rows = B·S, width P).
pub struct TopBlockActs<T> {
    /// [rows, P] = [B, S, heads, P/heads]
    pub q: T,
    pub k: T,
    pub v: T,
    /// The attention output [rows, P] and its log-sum-exps [B, heads, S].
    pub ctx: T,
    pub lse: T,
    /// Dropout(ctx·W_Oᵀ + b_O) [rows, P]: the LayerNorm's input (the block input is its
    /// residual).
    pub out: T,
    pub ln_mean: T,
    pub ln_rstd: T,
}

/// Top-attn's buffers.
pub struct TopActs<T> {
    /// The last layer's output [rows, H], kept before the top's output replaces it.
    pub input: T,
    /// Block inputs [rows, P]: xs[0] = down(input), xs[i + 1] block i's output; the last is
    /// the up-projection's input.
    pub xs: Vec<T>,
    pub blocks: Vec<TopBlockActs<T>>,
    // Scratch, shared by the blocks.
    /// [rows, P]: forward, an output before its dropout; backward, a gradient after
    /// dropout's backward.
    pub sub: T,
    /// [rows, P] each: the backward's ping-pong pair (d of a block's output, then of its
    /// input), d ctx, dq, dk, dv.
    pub d_a: T,
    pub d_b: T,
    pub d_ctx: T,
    pub dq: T,
    pub dk: T,
    pub dv: T,
    /// [B, heads, S]
    pub delta: T,
    /// LayerNorm backward's partials and the column sums' partials, sized for width P.
    pub ln_partials: T,
    pub colsum: T,
}

/// Buffers of the terms, per method. Scratch is shared by all layers.
pub enum TermActs<T> {
    Shared,
    Pals {
        layers: Vec<PalLayerActs<T>>,
        /// [rows, H]: d pre.
        d_pre: T,
        /// [rows, P] each: d ctx, dq, dk, dv, and d enc (kept from the LN2 point to the
        /// layer input's point of the backward).
        d_ctx: T,
        dq: T,
        dk: T,
        dv: T,
        d_enc: T,
        /// [B, heads, S]
        delta: T,
    },
    /// Low-rank layers and adapters: per bottleneck its pre-activation [rows, r] (low-rank:
    /// one per layer; adapters: attention then FFN per layer), and for adapters the
    /// attention adapter's input x [rows, H] per layer.
    Bottlenecks {
        pre: Vec<T>,
        inputs: Vec<T>,
        /// [rows, r]: GELU(pre), its gradient, d pre.
        g: T,
        d_g: T,
        d_pre: T,
        /// [rows, r]: the FFN adapter's d pre, kept until d a is complete (adapters;
        /// [0, r] for low-rank).
        d_pre_ffn: T,
        /// [rows, H]: d x of the attention adapter's input (adapters; [0, H] for low-rank).
        d_x: T,
    },
    Top(TopActs<T>),
}

/// Every buffer a multi-task step of one (batch, seq) bucket uses: the encoder's, the
/// terms' and the heads'.
pub struct TaskActivations {
    /// What the buffers are for: the model's method and its widest head.
    pub method: Method,
    pub max_labels: usize,
    pub encoder: Activations,
    pub terms: TermActs<Tensor>,
    pub head: HeadActs<Tensor>,
    pub all: Vec<Tensor>,
}

/// The head's buffers and what every method shares; logits are [B, max labels] and viewed
/// as [B, k] for a task of k.
pub struct HeadActs<T> {
    /// A term before it is added into a layer [rows, H].
    pub term: T,
    /// Dropout_head(pooled) [B, H], and the gradients of it and of pooled.
    pub input: T,
    pub d_input: T,
    pub d_pooled: T,
    pub logits: T,
    pub d_logits: T,
    /// The step's loss [1].
    pub loss: T,
}

fn build_terms<T>(
    c: &BertConfig,
    method: &Method,
    batch: usize,
    seq: usize,
    alloc: Alloc<T>,
) -> Result<TermActs<T>, GpuError> {
    let (h, rows, layers) = (c.hidden_size, batch * seq, c.num_hidden_layers);
    let mut a = |name: &str, shape: &[usize]| alloc(format!("tasks.{name}"), shape);
    Ok(match *method {
        Method::Shared | Method::Separate => TermActs::Shared,
        Method::Pals { dim, heads } => {
            let mut acts = Vec::with_capacity(layers);
            for l in 0..layers {
                let mut a = |name: &str, shape: &[usize]| a(&format!("pal.{l}.{name}"), shape);
                acts.push(PalLayerActs {
                    enc: a("enc", &[rows, dim])?,
                    q: a("q", &[rows, dim])?,
                    k: a("k", &[rows, dim])?,
                    v: a("v", &[rows, dim])?,
                    ctx: a("ctx", &[rows, dim])?,
                    lse: a("lse", &[batch, heads, seq])?,
                    pre: a("pre", &[rows, h])?,
                });
            }
            TermActs::Pals {
                layers: acts,
                d_pre: a("scratch.pal.d_pre", &[rows, h])?,
                d_ctx: a("scratch.pal.d_ctx", &[rows, dim])?,
                dq: a("scratch.pal.dq", &[rows, dim])?,
                dk: a("scratch.pal.dk", &[rows, dim])?,
                dv: a("scratch.pal.dv", &[rows, dim])?,
                d_enc: a("scratch.pal.d_enc", &[rows, dim])?,
                delta: a("scratch.pal.delta", &[batch, heads, seq])?,
            }
        }
        Method::LowRank { rank: r } | Method::Adapters { size: r } => {
            let adapters = matches!(method, Method::Adapters { .. });
            let per_layer = if adapters { 2 } else { 1 };
            let pre = (0..layers * per_layer)
                .map(|i| a(&format!("bottleneck.{}.{}.pre", i / per_layer, i % per_layer), &[rows, r]))
                .collect::<Result<Vec<_>, _>>()?;
            let inputs = (0..if adapters { layers } else { 0 })
                .map(|l| a(&format!("adapter.{l}.input"), &[rows, h]))
                .collect::<Result<Vec<_>, _>>()?;
            let (r2, h2) = if adapters { (rows, rows) } else { (0, 0) };
            TermActs::Bottlenecks {
                pre,
                inputs,
                g: a("scratch.bottleneck.g", &[rows, r])?,
                d_g: a("scratch.bottleneck.d_g", &[rows, r])?,
                d_pre: a("scratch.bottleneck.d_pre", &[rows, r])?,
                d_pre_ffn: a("scratch.bottleneck.d_pre_ffn", &[r2, r])?,
                d_x: a("scratch.bottleneck.d_x", &[h2, h])?,
            }
        }
        Method::TopAttn { dim, heads, blocks } => {
            TermActs::Top(build_top(dim, heads, blocks, h, batch, seq, &mut a)?)
        }
    })
}

/// An allocator of buffers named within the tasks' namespace.
type NamedAlloc<'a, T> = &'a mut dyn FnMut(&str, &[usize]) -> Result<T, GpuError>;

fn build_top<T>(
    dim: usize,
    heads: usize,
    blocks: usize,
    h: usize,
    batch: usize,
    seq: usize,
    a: NamedAlloc<T>,
) -> Result<TopActs<T>, GpuError> {
    let rows = batch * seq;
    let input = a("top.input", &[rows, h])?;
    let xs = (0..=blocks).map(|i| a(&format!("top.x.{i}"), &[rows, dim])).collect::<Result<Vec<_>, _>>()?;
    let mut acts = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let mut a = |name: &str, shape: &[usize]| a(&format!("top.block.{i}.{name}"), shape);
        acts.push(TopBlockActs {
            q: a("q", &[rows, dim])?,
            k: a("k", &[rows, dim])?,
            v: a("v", &[rows, dim])?,
            ctx: a("ctx", &[rows, dim])?,
            lse: a("lse", &[batch, heads, seq])?,
            out: a("out", &[rows, dim])?,
            ln_mean: a("ln_mean", &[rows])?,
            ln_rstd: a("ln_rstd", &[rows])?,
        });
    }
    let (ln_partials, ln_colsum) = layernorm::backward_scratch_len(rows, dim);
    let colsum = reduce::colsum_scratch_len(rows, dim).max(ln_colsum);
    Ok(TopActs {
        input,
        xs,
        blocks: acts,
        sub: a("scratch.top.sub", &[rows, dim])?,
        d_a: a("scratch.top.d_a", &[rows, dim])?,
        d_b: a("scratch.top.d_b", &[rows, dim])?,
        d_ctx: a("scratch.top.d_ctx", &[rows, dim])?,
        dq: a("scratch.top.dq", &[rows, dim])?,
        dk: a("scratch.top.dk", &[rows, dim])?,
        dv: a("scratch.top.dv", &[rows, dim])?,
        delta: a("scratch.top.delta", &[batch, heads, seq])?,
        ln_partials: a("scratch.top.ln_partials", &[ln_partials])?,
        colsum: a("scratch.top.colsum", &[colsum])?,
    })
}

fn build_head<T>(
    c: &BertConfig,
    max_labels: usize,
    batch: usize,
    seq: usize,
    alloc: Alloc<T>,
) -> Result<HeadActs<T>, GpuError> {
    let h = c.hidden_size;
    let mut a = |name: &str, shape: &[usize]| alloc(format!("tasks.{name}"), shape);
    Ok(HeadActs {
        term: a("scratch.term", &[batch * seq, h])?,
        input: a("head.input", &[batch, h])?,
        d_input: a("head.d_input", &[batch, h])?,
        d_pooled: a("head.d_pooled", &[batch, h])?,
        logits: a("head.logits", &[batch, max_labels])?,
        d_logits: a("head.d_logits", &[batch, max_labels])?,
        loss: a("head.loss", &[1])?,
    })
}

impl TaskActivations {
    /// (name, shape) of every buffer the terms and heads add to the encoder's
    /// (`Activations::plan`), for a model whose widest head has `max_labels` outputs.
    pub fn plan(
        c: &BertConfig,
        method: &Method,
        max_labels: usize,
        batch: usize,
        seq: usize,
    ) -> Vec<(String, Vec<usize>)> {
        let mut list = plan_of(|alloc| build_terms(c, method, batch, seq, alloc));
        list.extend(plan_of(|alloc| build_head(c, max_labels, batch, seq, alloc)));
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
}

impl HeadInputs {
    pub fn new(gpu: &Gpu, batch: usize) -> Result<HeadInputs, GpuError> {
        Ok(HeadInputs {
            labels: gpu.zeros("head.labels", &[batch])?,
            weights: gpu.zeros("head.weights", &[batch])?,
            regression: None,
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
    ) -> Result<MultiTaskModel, GpuError> {
        let op = "MultiTaskModel::upload";
        if method == Method::Separate {
            let detail = "method 'separate' is not one multi-task model: train each task as its own \
                          single-task 'shared' model (the trainer does that)";
            return Err(shape_error(op, detail.into()));
        }
        method.check_for(config).map_err(|detail| shape_error(op, detail))?;
        let bert = Bert::upload(gpu, config, shared)?;
        let mut modules = Vec::with_capacity(tasks.len());
        for (spec, weights) in tasks {
            if spec.num_labels == 0 || modules.iter().any(|m: &TaskModule| m.spec.name == spec.name) {
                let detail = format!("task '{}' with {} labels", spec.name, spec.num_labels);
                return Err(shape_error(op, format!("{detail}: duplicate or without outputs")));
            }
            let params = TaskTensors::new(config, &method, spec, |name, shape| {
                let host =
                    weights.get(name).ok_or_else(|| shape_error(op, format!("missing tensor '{name}'")))?;
                if host.shape != shape || host.data.len() != shape.iter().product::<usize>() {
                    let detail = format!("'{name}' has shape {:?}, expected {shape:?}", host.shape);
                    return Err(shape_error(op, detail));
                }
                gpu.upload(name, shape, &host.data)
            })?;
            let grads = TaskTensors::new(config, &method, spec, |name, shape| {
                gpu.zeros(&format!("grad {name}"), shape)
            })?;
            modules.push(TaskModule { spec: spec.clone(), params, grads });
        }
        Ok(MultiTaskModel { bert, method, tasks: modules })
    }

    pub fn task_index(&self, name: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t.spec.name == name)
    }

    fn max_labels(&self) -> usize {
        self.tasks.iter().map(|t| t.spec.num_labels).max().unwrap_or(1)
    }

    /// The buffers of one (batch, seq) bucket, for every task.
    pub fn activations(&self, gpu: &Gpu, batch: usize, seq: usize) -> Result<TaskActivations, GpuError> {
        let c = &self.bert.config;
        let encoder = self.bert.activations(gpu, batch, seq)?;
        let ((terms, head), all) = allocate(gpu, |alloc| {
            Ok((
                build_terms(c, &self.method, batch, seq, alloc)?,
                build_head(c, self.max_labels(), batch, seq, alloc)?,
            ))
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
        let hook = TaskHook { config: &self.bert.config, method: &self.method, module, acts };
        self.bert.forward_with(rec, &acts.encoder, inputs, dropout, &hook)?;
        let (head, b) = (&acts.head, acts.batch());
        let drop = dropout_spec(dropout, self.bert.config.hidden_dropout_prob, SITE_HEAD);
        let input = match drop {
            Some(spec) => {
                elementwise::dropout(rec, &acts.encoder.pooled, &head.input, spec)?;
                &head.input
            }
            None => &acts.encoder.pooled,
        };
        let logits = self.logits(acts, task)?;
        linear(rec, b, input, &module.params.head.w, &logits, Epilogue::Bias(&module.params.head.b))
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
        self.forward(rec, acts, inputs, task, dropout)?;
        let (head, b, k) = (&acts.head, acts.batch(), module.spec.num_labels);
        let (logits, d_logits) = (self.logits(acts, task)?, head.d_logits.view(&[b, k]));
        if module.spec.is_regression() {
            loss::mse(rec, &logits, &labels.labels, &labels.weights, &head.loss, &d_logits, 1.0)?;
        } else {
            loss::cross_entropy(rec, &logits, &labels.labels, &labels.weights, &head.loss, &d_logits, 1.0)?;
        }
        let drop = dropout_spec(dropout, self.bert.config.hidden_dropout_prob, SITE_HEAD);
        let input = if drop.is_some() { &head.input } else { &acts.encoder.pooled };
        let (p, g) = (&module.params.head, &module.grads.head);
        let grads = LinearGrads { dw: &g.w, db: &g.b, accumulate: false };
        let dx = Some((&head.d_input, Epilogue::None));
        linear_backward(rec, b, input, &p.w, &d_logits, grads, dx, &acts.encoder.colsum)?;
        let d_pooled = dropout_backward(rec, &head.d_input, &head.d_pooled, drop)?;
        let hook = TaskHook { config: &self.bert.config, method: &self.method, module, acts };
        self.bert.backward_with(rec, &acts.encoder, inputs, None, d_pooled, dropout, &hook)?;
        Ok(&head.loss)
    }

    /// Task `task`'s parameters, by name.
    pub fn download_task_weights(&self, gpu: &Gpu, task: usize) -> Result<Weights, GpuError> {
        self.task("download_task_weights", task)?.params.download(gpu)
    }

    /// Task `task`'s gradients, by parameter name.
    pub fn download_task_grads(&self, gpu: &Gpu, task: usize) -> Result<Weights, GpuError> {
        self.task("download_task_grads", task)?.grads.download(gpu)
    }
}

// ----------------------------------------------------------------------------------------
// The terms inside the layers

/// One task's terms for one step: the encoder calls it at every layer.
struct TaskHook<'a> {
    config: &'a BertConfig,
    method: &'a Method,
    module: &'a TaskModule,
    acts: &'a TaskActivations,
}

/// up(GELU(down(x))) into `out`, keeping the pre-activation in `pre` and GELU in `g`.
fn bottleneck_forward(
    rec: &mut Recorder,
    rows: usize,
    p: &Bottleneck,
    x: &Tensor,
    (pre, g): (&Tensor, &Tensor),
    out: &Tensor,
) -> Result<(), GpuError> {
    linear(rec, rows, x, &p.down.w, g, Epilogue::BiasGelu { bias: &p.down.b, pre })?;
    linear(rec, rows, g, &p.up.w, out, Epilogue::Bias(&p.up.b))
}

/// The bottleneck's parameter gradients from d out `dy`; leaves d pre in `d_pre` (the
/// caller adds d pre·down.w to its input's gradient when that is ready).
#[allow(clippy::too_many_arguments)]
fn bottleneck_backward(
    rec: &mut Recorder,
    rows: usize,
    (p, grads): (&Bottleneck, &Bottleneck),
    x: &Tensor,
    pre: &Tensor,
    dy: &Tensor,
    (g, d_g, d_pre): (&Tensor, &Tensor, &Tensor),
    colsum: &Tensor,
) -> Result<(), GpuError> {
    elementwise::gelu(rec, pre, g)?;
    let up = LinearGrads { dw: &grads.up.w, db: &grads.up.b, accumulate: false };
    linear_backward(rec, rows, g, &p.up.w, dy, up, Some((d_g, Epilogue::None)), colsum)?;
    elementwise::gelu_backward(rec, pre, d_g, d_pre)?;
    let down = LinearGrads { dw: &grads.down.w, db: &grads.down.b, accumulate: false };
    linear_backward(rec, rows, x, &p.down.w, d_pre, down, None, colsum)
}

/// Attention-probability dropout at `site`: none (p = 0) without a key.
fn attention_dropout(c: &BertConfig, key: Option<DropoutKey>, site: u32) -> DropoutSpec {
    let none = DropoutSpec { p: 0.0, seed: 0, stream: 0 };
    dropout_spec(key, c.attention_probs_dropout_prob, site).unwrap_or(none)
}

/// dx += dy·W for y = x·Wᵀ + b.
fn add_input_grad(
    rec: &mut Recorder,
    rows: usize,
    w: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<(), GpuError> {
    let (out, inner) = (w.shape[0], w.shape[1]);
    matmul(rec, dy, w, dx, &Matmul::new(rows, inner, out), Epilogue::Accumulate)
}

impl TaskHook<'_> {
    fn rows(&self) -> usize {
        self.acts.encoder.rows()
    }

    fn add_term(&self, rec: &mut Recorder, into: &Tensor) -> Result<(), GpuError> {
        elementwise::add_assign(rec, &self.acts.head.term, into)
    }

    fn pal_shape(&self) -> (AttentionShape, f32) {
        let (dim, heads) = match *self.method {
            Method::Pals { dim, heads } => (dim, heads),
            _ => (0, 1),
        };
        let (e, head_dim) = (&self.acts.encoder, dim / heads.max(1));
        let shape = AttentionShape { batch: e.batch, seq: e.seq, heads, head_dim };
        (shape, (1.0 / (head_dim as f64).sqrt()) as f32)
    }

    fn pal_dropout(&self, key: Option<DropoutKey>, layer: usize) -> DropoutSpec {
        attention_dropout(self.config, key, site(layer, Site::TaskSpecific))
    }

    /// TS(h) of PALs into the term buffer.
    fn pal_forward(
        &self,
        rec: &mut Recorder,
        inputs: &BatchInputs,
        l: usize,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let (Terms::Pals { encoder, decoder, layers }, TermActs::Pals { layers: acts, .. }) =
            (&self.module.params.terms, &self.acts.terms)
        else {
            return Ok(());
        };
        let (x, rows, h) = (&acts[l], self.rows(), &self.acts.encoder.hidden[l]);
        linear(rec, rows, h, &encoder.w, &x.enc, Epilogue::Bias(&encoder.b))?;
        for (p, out) in layers[l].iter().zip([&x.q, &x.k, &x.v]) {
            linear(rec, rows, &x.enc, &p.w, out, Epilogue::Bias(&p.b))?;
        }
        let ((shape, scale), drop) = (self.pal_shape(), self.pal_dropout(key, l));
        let mask = &inputs.buffers.mask;
        attention::attention_forward(rec, shape, &x.q, &x.k, &x.v, mask, &x.ctx, &x.lse, scale, drop)?;
        let gelu = Epilogue::BiasGelu { bias: &decoder.b, pre: &x.pre };
        linear(rec, rows, &x.ctx, &decoder.w, &self.acts.head.term, gelu)
    }

    /// PALs' gradients from dTS in grad_y; leaves d enc for `input_backward`. V^E and V^D
    /// serve every layer: the last layer (the backward's first) overwrites their gradients,
    /// the others add to them.
    fn pal_backward(
        &self,
        rec: &mut Recorder,
        inputs: &BatchInputs,
        l: usize,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let (
            Terms::Pals { encoder, decoder, layers },
            Terms::Pals { encoder: g_enc, decoder: g_dec, layers: g_layers },
            TermActs::Pals { layers: acts, d_pre, d_ctx, dq, dk, dv, d_enc, delta },
        ) = (&self.module.params.terms, &self.module.grads.terms, &self.acts.terms)
        else {
            return Ok(());
        };
        let (x, rows, e) = (&acts[l], self.rows(), &self.acts.encoder);
        let accumulate = l + 1 != self.config.num_hidden_layers;
        elementwise::gelu_backward(rec, &x.pre, &e.grad_y, d_pre)?;
        let grads = LinearGrads { dw: &g_dec.w, db: &g_dec.b, accumulate };
        linear_backward(
            rec,
            rows,
            &x.ctx,
            &decoder.w,
            d_pre,
            grads,
            Some((d_ctx, Epilogue::None)),
            &e.colsum,
        )?;
        let ((shape, scale), drop) = (self.pal_shape(), self.pal_dropout(key, l));
        let mask = &inputs.buffers.mask;
        #[rustfmt::skip]
        attention::attention_backward(
            rec, shape, &x.q, &x.k, &x.v, &x.ctx, d_ctx, mask, &x.lse, delta, dq, dk, dv, scale, drop,
        )?;
        for (i, ((p, g), dy)) in layers[l].iter().zip(&g_layers[l]).zip([dq, dk, dv]).enumerate() {
            let grads = LinearGrads { dw: &g.w, db: &g.b, accumulate: false };
            let epilogue = if i == 0 { Epilogue::None } else { Epilogue::Accumulate };
            linear_backward(rec, rows, &x.enc, &p.w, dy, grads, Some((d_enc, epilogue)), &e.colsum)?;
        }
        let grads = LinearGrads { dw: &g_enc.w, db: &g_enc.b, accumulate };
        linear_backward(rec, rows, &e.hidden[l], &encoder.w, d_enc, grads, None, &e.colsum)
    }
}

/// A Linear's gradients, overwritten.
fn overwrite(g: &Linear) -> LinearGrads<'_> {
    LinearGrads { dw: &g.w, db: &g.b, accumulate: false }
}

/// Top-attn's parameters and buffers, when that is the method.
type Top<'a> = (&'a Linear, &'a Linear, &'a [TopBlock], &'a TopActs<Tensor>);

impl TaskHook<'_> {
    fn top_params(&self) -> Option<Top<'_>> {
        match (&self.module.params.terms, &self.acts.terms) {
            (Terms::Top { down, up, blocks }, TermActs::Top(acts)) => Some((down, up, blocks, acts)),
            _ => None,
        }
    }

    /// (attention shape, scale) of the top's blocks.
    fn top_shape(&self) -> (AttentionShape, f32) {
        let (dim, heads) = match *self.method {
            Method::TopAttn { dim, heads, .. } => (dim, heads),
            _ => (0, 1),
        };
        let (e, head_dim) = (&self.acts.encoder, dim / heads.max(1));
        let shape = AttentionShape { batch: e.batch, seq: e.seq, heads, head_dim };
        (shape, (1.0 / (head_dim as f64).sqrt()) as f32)
    }

    /// (attention-probability dropout, output dropout) of block i.
    fn top_dropout(&self, key: Option<DropoutKey>, i: usize) -> (DropoutSpec, Option<DropoutSpec>) {
        let (attention, output) = top_dropout_sites(self.config, i);
        let hidden = dropout_spec(key, self.config.hidden_dropout_prob, output);
        (attention_dropout(self.config, key, attention), hidden)
    }

    fn top_norm<'n>(&self, block: &'n TopBlock) -> LayerNorm<'n> {
        LayerNorm { gamma: &block.norm.w, beta: &block.norm.b, eps: self.config.layer_norm_eps as f32 }
    }

    /// Replaces the sequence output hidden[L] by up(blocks(down(hidden[L]))), keeping
    /// hidden[L] in `input`.
    fn top_forward(
        &self,
        rec: &mut Recorder,
        inputs: &BatchInputs,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let Some((down, up, blocks, t)) = self.top_params() else {
            return Ok(());
        };
        let (rows, e) = (self.rows(), &self.acts.encoder);
        let sequence = &e.hidden[self.config.num_hidden_layers];
        let ((shape, scale), mask) = (self.top_shape(), &inputs.buffers.mask);
        copy(rec, sequence, &t.input)?;
        linear(rec, rows, &t.input, &down.w, &t.xs[0], Epilogue::Bias(&down.b))?;
        for (i, (p, x)) in blocks.iter().zip(&t.blocks).enumerate() {
            for (w, out) in p.qkv.iter().zip([&x.q, &x.k, &x.v]) {
                linear(rec, rows, &t.xs[i], &w.w, out, Epilogue::Bias(&w.b))?;
            }
            let (attention_drop, output_drop) = self.top_dropout(key, i);
            #[rustfmt::skip]
            attention::attention_forward(
                rec, shape, &x.q, &x.k, &x.v, mask, &x.ctx, &x.lse, scale, attention_drop,
            )?;
            let target = if output_drop.is_some() { &t.sub } else { &x.out };
            linear(rec, rows, &x.ctx, &p.output.w, target, Epilogue::Bias(&p.output.b))?;
            if let Some(spec) = output_drop {
                elementwise::dropout(rec, &t.sub, &x.out, spec)?;
            }
            let ln_stats = stats(&x.ln_mean, &x.ln_rstd);
            layernorm::layernorm_forward(
                rec,
                &self.top_norm(p),
                &x.out,
                Some(&t.xs[i]),
                &t.xs[i + 1],
                &ln_stats,
            )?;
        }
        linear(rec, rows, &t.xs[blocks.len()], &up.w, sequence, Epilogue::Bias(&up.b))
    }

    /// The top's gradients from d(sequence output) in grad_x; leaves d(last layer's output)
    /// there. Each parameter serves once: its gradient is overwritten.
    fn top_backward(
        &self,
        rec: &mut Recorder,
        inputs: &BatchInputs,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let (Some((down, up, blocks, t)), Terms::Top { down: g_down, up: g_up, blocks: g_blocks }) =
            (self.top_params(), &self.module.grads.terms)
        else {
            return Ok(());
        };
        let (rows, e) = (self.rows(), &self.acts.encoder);
        let ((shape, scale), mask) = (self.top_shape(), &inputs.buffers.mask);
        // d of a block's output in d_out, of its input in d_in; they swap after each block.
        let (mut d_out, mut d_in) = (&t.d_a, &t.d_b);
        let dx = Some((d_out, Epilogue::None));
        linear_backward(rec, rows, &t.xs[blocks.len()], &up.w, &e.grad_x, overwrite(g_up), dx, &e.colsum)?;
        for i in (0..blocks.len()).rev() {
            let (p, g, x) = (&blocks[i], &g_blocks[i], &t.blocks[i]);
            let (attention_drop, output_drop) = self.top_dropout(key, i);
            // xs[i + 1] = LN(out + xs[i]): d out = d xs[i] through the residual, into d_in.
            let grads = LayerNormGrads { dx: d_in, dgamma: &g.norm.w, dbeta: &g.norm.b };
            let scratch = LayerNormScratch { partials: &t.ln_partials, colsum: Some(&t.colsum) };
            let ln_stats = stats(&x.ln_mean, &x.ln_rstd);
            #[rustfmt::skip]
            layernorm::layernorm_backward_with_scratch(
                rec, &self.top_norm(p), &x.out, Some(&t.xs[i]), &ln_stats, d_out, &grads, &scratch,
            )?;
            let d_proj = dropout_backward(rec, d_in, &t.sub, output_drop)?;
            let dx = Some((&t.d_ctx, Epilogue::None));
            linear_backward(rec, rows, &x.ctx, &p.output.w, d_proj, overwrite(&g.output), dx, &t.colsum)?;
            #[rustfmt::skip]
            attention::attention_backward(
                rec, shape, &x.q, &x.k, &x.v, &x.ctx, &t.d_ctx, mask, &x.lse, &t.delta,
                &t.dq, &t.dk, &t.dv, scale, attention_drop,
            )?;
            for ((w, g), dy) in p.qkv.iter().zip(&g.qkv).zip([&t.dq, &t.dk, &t.dv]) {
                let dx = Some((d_in, Epilogue::Accumulate));
                linear_backward(rec, rows, &t.xs[i], &w.w, dy, overwrite(g), dx, &t.colsum)?;
            }
            std::mem::swap(&mut d_out, &mut d_in);
        }
        let dx = Some((&e.grad_x, Epilogue::None));
        linear_backward(rec, rows, &t.input, &down.w, d_out, overwrite(g_down), dx, &t.colsum)
    }
}

impl LayerHook for TaskHook<'_> {
    fn sequence_output(
        &self,
        rec: &mut Recorder,
        _acts: &Activations,
        inputs: &BatchInputs,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        self.top_forward(rec, inputs, key)
    }

    fn sequence_output_backward(
        &self,
        rec: &mut Recorder,
        _acts: &Activations,
        inputs: &BatchInputs,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        self.top_backward(rec, inputs, key)
    }

    fn attention_output(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        _inputs: &BatchInputs,
        l: usize,
        _key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let (Terms::Adapters { layers }, TermActs::Bottlenecks { pre, inputs, g, .. }) =
            (&self.module.params.terms, &self.acts.terms)
        else {
            return Ok(());
        };
        let attn_drop = &acts.layers[l].attn_drop;
        copy(rec, attn_drop, &inputs[l])?;
        bottleneck_forward(
            rec,
            self.rows(),
            &layers[l][0],
            &inputs[l],
            (&pre[2 * l], g),
            &self.acts.head.term,
        )?;
        self.add_term(rec, attn_drop)
    }

    fn ffn_output(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        l: usize,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let (rows, x, term) = (self.rows(), &acts.layers[l], &self.acts.head.term);
        match (&self.module.params.terms, &self.acts.terms) {
            (Terms::Shared | Terms::Top { .. }, _) => return Ok(()),
            (Terms::Pals { .. }, _) => self.pal_forward(rec, inputs, l, key)?,
            (Terms::LowRank { layers }, TermActs::Bottlenecks { pre, g, .. }) => {
                bottleneck_forward(rec, rows, &layers[l], &acts.hidden[l], (&pre[l], g), term)?
            }
            (Terms::Adapters { layers }, TermActs::Bottlenecks { pre, g, .. }) => {
                bottleneck_forward(rec, rows, &layers[l][1], &x.a, (&pre[2 * l + 1], g), term)?
            }
            _ => return Err(shape_error("TaskHook", "activations of another method".into())),
        }
        self.add_term(rec, &x.ffn_drop)
    }

    fn ffn_output_backward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        l: usize,
        key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        let rows = self.rows();
        match (&self.module.params.terms, &self.module.grads.terms, &self.acts.terms) {
            (Terms::Pals { .. }, _, _) => self.pal_backward(rec, inputs, l, key),
            (
                Terms::LowRank { layers },
                Terms::LowRank { layers: grads },
                TermActs::Bottlenecks { pre, g, d_g, d_pre, .. },
            ) => {
                let params = (&layers[l], &grads[l]);
                let scratch = (g, d_g, d_pre);
                bottleneck_backward(
                    rec,
                    rows,
                    params,
                    &acts.hidden[l],
                    &pre[l],
                    &acts.grad_y,
                    scratch,
                    &acts.colsum,
                )
            }
            (
                Terms::Adapters { layers },
                Terms::Adapters { layers: grads },
                TermActs::Bottlenecks { pre, g, d_g, d_pre_ffn, .. },
            ) => {
                let params = (&layers[l][1], &grads[l][1]);
                let (x, scratch) = (&acts.layers[l].a, (g, d_g, d_pre_ffn));
                bottleneck_backward(
                    rec,
                    rows,
                    params,
                    x,
                    &pre[2 * l + 1],
                    &acts.grad_y,
                    scratch,
                    &acts.colsum,
                )
            }
            _ => Ok(()),
        }
    }

    fn ffn_input_backward(&self, rec: &mut Recorder, acts: &Activations, l: usize) -> Result<(), GpuError> {
        match (&self.module.params.terms, &self.acts.terms) {
            (Terms::Adapters { layers }, TermActs::Bottlenecks { d_pre_ffn, .. }) => {
                add_input_grad(rec, self.rows(), &layers[l][1].down.w, d_pre_ffn, &acts.grad_y)
            }
            _ => Ok(()),
        }
    }

    fn attention_output_backward<'a>(
        &'a self,
        rec: &mut Recorder,
        acts: &'a Activations,
        l: usize,
    ) -> Result<&'a Tensor, GpuError> {
        let (
            Terms::Adapters { layers },
            Terms::Adapters { layers: grads },
            TermActs::Bottlenecks { pre, inputs, g, d_g, d_pre, d_x, .. },
        ) = (&self.module.params.terms, &self.module.grads.terms, &self.acts.terms)
        else {
            return Ok(&acts.grad_x);
        };
        let (rows, params) = (self.rows(), (&layers[l][0], &grads[l][0]));
        let scratch = (g, d_g, d_pre);
        bottleneck_backward(rec, rows, params, &inputs[l], &pre[2 * l], &acts.grad_x, scratch, &acts.colsum)?;
        copy(rec, &acts.grad_x, d_x)?;
        add_input_grad(rec, rows, &layers[l][0].down.w, d_pre, d_x)?;
        Ok(d_x)
    }

    fn input_backward(&self, rec: &mut Recorder, acts: &Activations, l: usize) -> Result<(), GpuError> {
        let rows = self.rows();
        match (&self.module.params.terms, &self.acts.terms) {
            (Terms::Pals { encoder, .. }, TermActs::Pals { d_enc, .. }) => {
                add_input_grad(rec, rows, &encoder.w, d_enc, &acts.grad_x)
            }
            (Terms::LowRank { layers }, TermActs::Bottlenecks { d_pre, .. }) => {
                add_input_grad(rec, rows, &layers[l].down.w, d_pre, &acts.grad_x)
            }
            _ => Ok(()),
        }
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
