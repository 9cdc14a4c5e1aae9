//! The interface every task method implements, the list of methods, and the one place a
//! method is chosen ([`Method::imp`]). Adding a method: its file here, its reference file
//! (reference/tasks/), its test (tests/tasks_gpu.rs), and one line in each list below.

use std::any::Any;
use std::str::FromStr;

use super::TaskActivations;
use super::{adapters::Adapters, low_rank::LowRank, pals::Pals, shared::Shared, top_attn::TopAttn};
use crate::contract::{SITE_HEAD, top_dropout_sites};
use crate::gpu::{GpuError, Tensor};
use crate::kernels::attention::MAX_HEAD_DIM;
use crate::model::BertConfig;
use crate::model::bert::ByName;
use crate::model::blocks::{Alloc, Planned, plan_of, shape_error};
use crate::model::hook::LayerHook;

/// The paper's sizes for BERT-base (hidden 768); other widths scale them.
const BASE_HIDDEN: usize = 768;
pub const PAL_DIM_BASE: usize = 204;
pub const PAL_HEADS: usize = 6;
pub const LOW_RANK_BASE: usize = 100;
pub const ADAPTER_BASE: usize = 50;
pub const TOP_DIM_BASE: usize = 204;
pub const TOP_HEADS: usize = 12;
pub const TOP_BLOCKS: usize = 6;

/// A method by name, as the command line and the run settings spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodName {
    Shared,
    Pals,
    LowRank,
    Adapters,
    TopAttn,
    Separate,
}

impl MethodName {
    pub const ALL: [MethodName; 6] = [
        MethodName::Shared,
        MethodName::Pals,
        MethodName::LowRank,
        MethodName::Adapters,
        MethodName::TopAttn,
        MethodName::Separate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::Shared => "shared",
            MethodName::Pals => "pals",
            MethodName::LowRank => "low-rank",
            MethodName::Adapters => "adapters",
            MethodName::TopAttn => "top-attn",
            MethodName::Separate => "separate",
        }
    }
}

impl std::fmt::Display for MethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MethodName {
    type Err = String;

    fn from_str(name: &str) -> Result<MethodName, String> {
        MethodName::ALL.into_iter().find(|m| m.as_str() == name).ok_or_else(|| {
            let names: Vec<&str> = MethodName::ALL.iter().map(|m| m.as_str()).collect();
            format!("unknown method '{name}': expected one of {}", names.join(", "))
        })
    }
}

/// A method with its sizes.
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
    /// [`Method::Shared`] model, and `MultiTaskModel::upload` refuses it; it exists here
    /// for its name and its parameter count.
    Separate,
}

/// round(hidden · base / 768) to a multiple of `multiple`, at least `multiple`.
fn scaled(hidden: usize, base: usize, multiple: usize) -> usize {
    let units = (hidden * base) as f64 / (BASE_HIDDEN * multiple) as f64;
    (units.round() as usize).max(1) * multiple
}

impl Method {
    /// The method `name` with the paper's sizes scaled to the model's width: PALs 204 (6
    /// heads of 34) at hidden 768, 102 (6 × 17) at 384; low-rank 100 and adapters 50 at
    /// 768; top-attn 6 blocks of 204 (12 heads of 17) at 768, 108 (12 × 9) at 384.
    pub fn sized(name: MethodName, c: &BertConfig) -> Method {
        let h = c.hidden_size;
        match name {
            MethodName::Shared => Method::Shared,
            MethodName::Pals => Method::Pals { dim: scaled(h, PAL_DIM_BASE, PAL_HEADS), heads: PAL_HEADS },
            MethodName::LowRank => Method::LowRank { rank: scaled(h, LOW_RANK_BASE, 1) },
            MethodName::Adapters => Method::Adapters { size: scaled(h, ADAPTER_BASE, 1) },
            MethodName::TopAttn => Method::TopAttn {
                dim: scaled(h, TOP_DIM_BASE, TOP_HEADS),
                heads: TOP_HEADS,
                blocks: TOP_BLOCKS,
            },
            MethodName::Separate => Method::Separate,
        }
    }

    /// `sized` for a method named as on the command line.
    pub fn default_for(name: &str, c: &BertConfig) -> Result<Method, String> {
        Ok(Method::sized(name.parse()?, c))
    }

    /// The implementation: the only match on the method outside the lists above.
    pub fn imp(&self) -> Box<dyn TaskMethod> {
        match *self {
            Method::Shared => Box::new(Shared { separate: false }),
            Method::Separate => Box::new(Shared { separate: true }),
            Method::Pals { dim, heads } => Box::new(Pals { dim, heads }),
            Method::LowRank { rank } => Box::new(LowRank { rank }),
            Method::Adapters { size } => Box::new(Adapters { size }),
            Method::TopAttn { dim, heads, blocks } => Box::new(TopAttn { dim, heads, blocks }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.imp().name().as_str()
    }

    /// An error unless the sizes are usable: non-zero, attention heads dividing their
    /// width (PALs, top-attn), and a head no wider than the attention kernel allows.
    pub fn check(&self) -> Result<(), String> {
        self.imp().check()
    }

    /// `check`, and what the model's configuration adds (top-attn: every dropout site fits
    /// below the head's).
    pub fn check_for(&self, c: &BertConfig) -> Result<(), String> {
        let imp = self.imp();
        imp.check()?;
        imp.check_for(c)
    }
}

/// A method's buffers of one (batch, seq) bucket, made by its `activations`.
pub type MethodActs = Box<dyn Any + Send + Sync>;

/// A method's buffers of one bucket, from one builder generic over what `alloc` makes
/// (tensors, or plan entries for the memory report).
pub trait MethodBuffers {
    type Acts<T>;

    /// The buffers (only a forward's without `bucket.training`).
    fn build<T: Clone>(
        &self,
        c: &BertConfig,
        bucket: Bucket,
        alloc: Alloc<T>,
    ) -> Result<Self::Acts<T>, GpuError>;
}

/// [`MethodBuffers`] as [`TaskMethod`] uses them: allocated and boxed, or planned.
pub trait Buffers {
    fn activations(
        &self,
        c: &BertConfig,
        bucket: Bucket,
        alloc: Alloc<Tensor>,
    ) -> Result<MethodActs, GpuError>;

    /// (name, shape) of what `activations` allocates.
    fn plan(&self, c: &BertConfig, bucket: Bucket) -> Vec<Planned>;
}

impl<M: MethodBuffers> Buffers for M
where
    M::Acts<Tensor>: Any + Send + Sync,
{
    fn activations(
        &self,
        c: &BertConfig,
        bucket: Bucket,
        alloc: Alloc<Tensor>,
    ) -> Result<MethodActs, GpuError> {
        Ok(Box::new(self.build(c, bucket, alloc)?))
    }

    fn plan(&self, c: &BertConfig, bucket: Bucket) -> Vec<Planned> {
        plan_of(|alloc| self.build(c, bucket, alloc))
    }
}

/// What a task method is: its parameters, its buffers, and (through [`TaskTerms`]) what it
/// adds to a layer's forward and backward.
pub trait TaskMethod: Buffers {
    fn name(&self) -> MethodName;

    /// An error unless the sizes are usable.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// What the model's configuration adds to `check`.
    fn check_for(&self, _c: &BertConfig) -> Result<(), String> {
        Ok(())
    }

    /// One task's parameters (the head excluded), each name after the task's `prefix`.
    fn param_shapes(&self, c: &BertConfig, prefix: &str) -> Vec<(String, Vec<usize>)>;

    /// Whether each task has its own encoder (separate models; counted, not built here).
    fn own_encoder(&self) -> bool {
        false
    }

    /// One task's terms from its parameters and gradients (None: inference), found by
    /// `param_shapes` name after `prefix`.
    fn terms(
        &self,
        c: &BertConfig,
        prefix: &str,
        params: &ByName,
        grads: Option<&ByName>,
    ) -> Box<dyn TaskTerms>;
}

/// The shape of one bucket's buffers: batch, sequence length, and whether a backward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub batch: usize,
    pub seq: usize,
    pub training: bool,
}

impl Bucket {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Rows of a backward-only buffer: none for inference.
    pub fn backward_rows(&self) -> usize {
        if self.training { self.rows() } else { 0 }
    }
}

/// One task's terms: the hook the encoder calls at every layer for one step.
pub trait TaskTerms: Send + Sync {
    fn hook<'a>(
        &'a self,
        c: &'a BertConfig,
        acts: &'a TaskActivations,
    ) -> Result<Box<dyn LayerHook + 'a>, GpuError>;
}

/// A method's buffers, by type: an error if `acts` were made by another method.
pub(crate) fn acts_of<'a, S: 'static>(acts: &'a TaskActivations, method: &str) -> Result<&'a S, GpuError> {
    acts.terms
        .downcast_ref::<S>()
        .ok_or_else(|| shape_error(method, format!("activations made for {:?}", acts.method)))
}

/// A task's gradients: an error for a model loaded for inference.
pub(crate) fn grads_of<'a, S>(grads: &'a Option<S>, method: &str) -> Result<&'a S, GpuError> {
    grads.as_ref().ok_or_else(|| shape_error(method, "an inference model has no gradients".into()))
}

/// A Linear's two parameters: weight [out, in] and bias [out].
pub(crate) fn linear_shapes(name: String, out: usize, inp: usize) -> [(String, Vec<usize>); 2] {
    [(format!("{name}.weight"), vec![out, inp]), (format!("{name}.bias"), vec![out])]
}

pub(crate) fn check_heads(what: &str, dim: usize, heads: usize) -> Result<(), String> {
    if heads == 0 || dim == 0 || !dim.is_multiple_of(heads) {
        return Err(format!("{what} width {dim} is not a positive multiple of {heads} heads"));
    }
    if dim / heads > MAX_HEAD_DIM {
        return Err(format!("{what} head width {} exceeds {MAX_HEAD_DIM}", dim / heads));
    }
    Ok(())
}

/// Whether top-attn's `blocks` fit below the head's dropout site.
pub(crate) fn top_sites_fit(c: &BertConfig, blocks: usize) -> Result<(), String> {
    if blocks > 0 && top_dropout_sites(c.num_hidden_layers, blocks - 1).1 >= SITE_HEAD {
        let detail = format!("{blocks} blocks after {} layers", c.num_hidden_layers);
        return Err(format!("top-attn has more dropout sites than a step has: {detail}"));
    }
    Ok(())
}
