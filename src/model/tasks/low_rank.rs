//! `low-rank`: the PALs placement with a plain bottleneck, inside LN2 of every layer:
//! TS(h) = V^D_l·GELU(V^E_l·h + b_E) + b_D,  V^E_l [r, H], V^D_l [H, r].
//! Reference: reference/tasks/low_rank.rs.

use super::TaskActivations;
use super::method::{
    Bucket, MethodBuffers, MethodName, TaskMethod, TaskTerms, acts_of, grads_of, linear_shapes,
};
use crate::gpu::ElementType::F32;
use crate::gpu::{GpuError, Recorder, Tensor};
use crate::kernels::elementwise;
use crate::model::BertConfig;
use crate::model::bert::ByName;
use crate::model::blocks::{Alloc, Bottleneck, BottleneckBuffers, add_input_grad, per_layer};
use crate::model::hook::{HookStep, LayerHook};

pub struct LowRank {
    pub rank: usize,
}

/// Per layer its bottleneck's pre-activation [rows, r], and the shared scratch.
pub struct LowRankActs<T> {
    pub pre: Vec<T>,
    pub scratch: BottleneckBuffers<T>,
}

impl MethodBuffers for LowRank {
    type Acts<T> = LowRankActs<T>;

    fn build<T: Clone>(
        &self,
        c: &BertConfig,
        b: Bucket,
        alloc: Alloc<T>,
    ) -> Result<LowRankActs<T>, GpuError> {
        let (rows, r) = (b.rows(), self.rank);
        let mut a = |name: &str, shape: &[usize]| alloc(format!("tasks.{name}"), shape, F32);
        let pre =
            per_layer(c.num_hidden_layers, b.training, |l| a(&format!("bottleneck.{l}.0.pre"), &[rows, r]))?;
        let scratch = BottleneckBuffers::build((rows, b.backward_rows(), r), &mut a)?;
        Ok(LowRankActs { pre, scratch })
    }
}

impl TaskMethod for LowRank {
    fn name(&self) -> MethodName {
        MethodName::LowRank
    }

    fn check(&self) -> Result<(), String> {
        if self.rank == 0 { Err("low-rank needs a non-zero width".into()) } else { Ok(()) }
    }

    fn param_shapes(&self, c: &BertConfig, p: &str) -> Vec<(String, Vec<usize>)> {
        let (h, r) = (c.hidden_size, self.rank);
        let mut shapes = Vec::new();
        for l in 0..c.num_hidden_layers {
            shapes.extend(linear_shapes(format!("{p}low_rank.layer.{l}.encoder"), r, h));
            shapes.extend(linear_shapes(format!("{p}low_rank.layer.{l}.decoder"), h, r));
        }
        shapes
    }

    fn terms(&self, c: &BertConfig, p: &str, params: &ByName, grads: Option<&ByName>) -> Box<dyn TaskTerms> {
        let of = |t: &ByName| {
            let layer = |l| Bottleneck {
                down: t.linear(&format!("{p}low_rank.layer.{l}.encoder")),
                up: t.linear(&format!("{p}low_rank.layer.{l}.decoder")),
            };
            (0..c.num_hidden_layers).map(layer).collect()
        };
        Box::new(LowRankTerms { params: of(params), grads: grads.map(of) })
    }
}

/// One task's bottleneck per layer (or their gradients).
struct LowRankTerms {
    params: Vec<Bottleneck>,
    grads: Option<Vec<Bottleneck>>,
}

impl TaskTerms for LowRankTerms {
    fn hook<'a>(
        &'a self,
        _c: &'a BertConfig,
        acts: &'a TaskActivations,
    ) -> Result<Box<dyn LayerHook + 'a>, GpuError> {
        let own = acts_of::<LowRankActs<Tensor>>(acts, "low-rank")?;
        Ok(Box::new(LowRankHook { terms: self, own, term: &acts.head.term }))
    }
}

struct LowRankHook<'a> {
    terms: &'a LowRankTerms,
    own: &'a LowRankActs<Tensor>,
    term: &'a Tensor,
}

impl LayerHook for LowRankHook<'_> {
    fn ffn_output(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let (x, keep) = (&s.acts.hidden[l], (&self.own.pre[l], &self.own.scratch.g));
        self.terms.params[l].forward(rec, s.acts.rows(), x, keep, self.term)?;
        elementwise::add_assign(rec, self.term, &s.acts.layers[l].ffn_drop)
    }

    /// The bottleneck's gradients from dTS in grad_y; leaves d pre for `input_backward`.
    fn ffn_output_backward(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let grads = &grads_of(&self.terms.grads, "low-rank")?[l];
        let (e, saved) = (s.acts, (&s.acts.hidden[l], &self.own.pre[l]));
        let scratch = self.own.scratch.scratch();
        self.terms.params[l].backward(rec, e.rows(), grads, saved, &e.grad_y, &scratch, &e.colsum)
    }

    fn input_backward(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let down = &self.terms.params[l].down.w;
        add_input_grad(rec, s.acts.rows(), down, &self.own.scratch.d_pre, &s.acts.grad_x)
    }
}
