//! `top-attn`: nothing inside the layers; the last layer's output y is replaced by
//! up(B_{n-1}(…B_0(down(y)))), down [P, H], up [H, P], with n attention blocks in P dims:
//! B_i(x) = LN_i(Dropout(MHA_i(x)·W_Oᵀ + b_O) + x) — the attention sublayer
//! ([`AttentionBlock`]) with `heads` heads of P/heads, the encoder's mask and
//! attention-probability dropout; LN_i over P. The pooler reads the replaced output.
//!
//! The original top-attn code (Bert-n-Pals, `config.top`) is the same: down, six
//! `BERTAttention(config, 12)` blocks, up, no activation. Its block LayerNorms start from
//! N(0, 0.02) for γ and β, close to zero; we start them as BERT's, γ = 1 and β = 0. The
//! width P scales 204 (at hidden 768) with the model, rounded to a multiple of the 12 heads,
//! ties up: 108 = 12·9 at hidden 384 (204·384/768 = 102 = 12·8.5), 12 at hidden 32.
//! Dropout: block i draws its attention probabilities at site(L + 2i, TaskSpecific) and its
//! output at site(L + 2i + 1, TaskSpecific), virtual layers past the encoder's L (see
//! [`top_dropout_sites`]); with hidden_dropout_prob and attention_probs_dropout_prob.
//! Reference: reference/tasks/top_attn.rs.

use super::TaskActivations;
use super::method::{
    Bucket, MethodBuffers, MethodName, TaskMethod, TaskTerms, acts_of, check_heads, grads_of, linear_shapes,
    top_sites_fit,
};
use crate::contract::{AttentionShape, DropoutSpec, top_dropout_sites};
use crate::gpu::ElementType::F32;
use crate::gpu::{GpuError, Recorder, Tensor};
use crate::kernels::layernorm::{self, LayerNormScratch};
use crate::kernels::matmul::Epilogue;
use crate::kernels::reduce;
use crate::model::BertConfig;
use crate::model::bert::ByName;
use crate::model::blocks::{
    Alloc, AttentionActs, AttentionBlock, AttentionScratch, AttentionStep, GradMode, Linear, copy, in_turn,
    per_layer,
};
use crate::model::hook::{HookStep, LayerHook};

pub struct TopAttn {
    pub dim: usize,
    pub heads: usize,
    pub blocks: usize,
}

/// The down- and up-projections and the blocks between them (or their gradients).
#[derive(Clone)]
pub struct TopParams {
    pub down: Linear,
    pub up: Linear,
    pub blocks: Vec<AttentionBlock>,
}

/// Top-attn's buffers (rows = B·S, width P).
pub struct TopActs<T> {
    /// The last layer's output [rows, H], kept before the top's output replaces it.
    pub input: T,
    /// Block inputs [rows, P]: xs[0] = down(input), xs[i + 1] block i's output; the last is
    /// the up-projection's input.
    pub xs: Vec<T>,
    pub blocks: Vec<AttentionActs<T>>,
    // Scratch, shared by the blocks.
    /// [rows, P]: forward, an output before its dropout; backward, a gradient after
    /// dropout's backward.
    pub sub: T,
    /// [rows, P] each (backward only): the ping-pong pair (d of a block's output, then of
    /// its input), d ctx, dq, dk, dv.
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

impl TopAttn {
    fn shape(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape { batch, seq, heads: self.heads, head_dim: self.dim / self.heads.max(1) }
    }
}

impl MethodBuffers for TopAttn {
    type Acts<T> = TopActs<T>;

    fn build<T: Clone>(&self, c: &BertConfig, b: Bucket, alloc: Alloc<T>) -> Result<TopActs<T>, GpuError> {
        let (h, rows, brows, dim) = (c.hidden_size, b.rows(), b.backward_rows(), self.dim);
        let mut a = |name: &str, shape: &[usize]| alloc(format!("tasks.{name}"), shape, F32);
        let input = a("top.input", &[rows, h])?;
        let xs = in_turn(self.blocks + 1, b.training, |i| a(&format!("top.x.{i}"), &[rows, dim]))?;
        let shape = self.shape(b.batch, b.seq);
        let blocks = per_layer(self.blocks, b.training, |i| {
            // The top blocks are f32 throughout.
            let mut a = |name: &str, shape: &[usize], dtype| {
                debug_assert_eq!(dtype, F32, "top.block.{i}.{name}");
                a(&format!("top.block.{i}.{name}"), shape)
            };
            AttentionActs::build(shape, ["out", "ln_mean", "ln_rstd"], F32, &mut a)
        })?;
        let (ln_partials, ln_colsum) = layernorm::backward_scratch_len(brows, dim);
        let colsum = reduce::colsum_scratch_len(brows, dim).max(ln_colsum);
        let delta_batch = if b.training { b.batch } else { 0 };
        Ok(TopActs {
            input,
            xs,
            blocks,
            sub: a("scratch.top.sub", &[rows, dim])?,
            d_a: a("scratch.top.d_a", &[brows, dim])?,
            d_b: a("scratch.top.d_b", &[brows, dim])?,
            d_ctx: a("scratch.top.d_ctx", &[brows, dim])?,
            dq: a("scratch.top.dq", &[brows, dim])?,
            dk: a("scratch.top.dk", &[brows, dim])?,
            dv: a("scratch.top.dv", &[brows, dim])?,
            delta: a("scratch.top.delta", &[delta_batch, self.heads, b.seq])?,
            ln_partials: a("scratch.top.ln_partials", &[ln_partials])?,
            colsum: a("scratch.top.colsum", &[colsum])?,
        })
    }
}

impl TaskMethod for TopAttn {
    fn name(&self) -> MethodName {
        MethodName::TopAttn
    }

    fn check(&self) -> Result<(), String> {
        if self.blocks == 0 {
            return Err("top-attn needs at least one block".into());
        }
        check_heads("top-attn", self.dim, self.heads)
    }

    fn check_for(&self, c: &BertConfig) -> Result<(), String> {
        top_sites_fit(c, self.blocks)
    }

    fn param_shapes(&self, c: &BertConfig, p: &str) -> Vec<(String, Vec<usize>)> {
        let (h, dim) = (c.hidden_size, self.dim);
        let mut shapes = Vec::new();
        shapes.extend(linear_shapes(format!("{p}top.down"), dim, h));
        for i in 0..self.blocks {
            for which in ["query", "key", "value", "output"] {
                shapes.extend(linear_shapes(format!("{p}top.block.{i}.{which}"), dim, dim));
            }
            let norm = format!("{p}top.block.{i}.LayerNorm");
            shapes.extend([(format!("{norm}.weight"), vec![dim]), (format!("{norm}.bias"), vec![dim])]);
        }
        shapes.extend(linear_shapes(format!("{p}top.up"), h, dim));
        shapes
    }

    fn terms(&self, _c: &BertConfig, p: &str, params: &ByName, grads: Option<&ByName>) -> Box<dyn TaskTerms> {
        let of = |t: &ByName| TopParams {
            down: t.linear(&format!("{p}top.down")),
            up: t.linear(&format!("{p}top.up")),
            blocks: (0..self.blocks)
                .map(|i| {
                    let name = |which: &str| format!("{p}top.block.{i}.{which}");
                    AttentionBlock {
                        qkv: ["query", "key", "value"].map(|w| t.linear(&name(w))),
                        output: t.linear(&name("output")),
                        norm: t.norm(&name("LayerNorm")),
                    }
                })
                .collect(),
        };
        let top = TopAttn { dim: self.dim, heads: self.heads, blocks: self.blocks };
        Box::new(TopTerms { top, params: of(params), grads: grads.map(of) })
    }
}

/// One task's top.
struct TopTerms {
    top: TopAttn,
    params: TopParams,
    grads: Option<TopParams>,
}

impl TaskTerms for TopTerms {
    fn hook<'a>(
        &'a self,
        c: &'a BertConfig,
        acts: &'a TaskActivations,
    ) -> Result<Box<dyn LayerHook + 'a>, GpuError> {
        let own = acts_of::<TopActs<Tensor>>(acts, "top-attn")?;
        Ok(Box::new(TopHook { c, terms: self, own }))
    }
}

struct TopHook<'a> {
    c: &'a BertConfig,
    terms: &'a TopTerms,
    own: &'a TopActs<Tensor>,
}

impl TopHook<'_> {
    /// Block i's step: shape, mask, attention-probability and output dropout.
    fn step<'m>(&self, s: &HookStep<'m>, i: usize) -> AttentionStep<'m> {
        let (attention, output) = top_dropout_sites(self.c.num_hidden_layers, i);
        AttentionStep {
            shape: self.terms.top.shape(s.acts.batch, s.acts.seq),
            mask: &s.inputs.buffers.mask,
            probs_drop: DropoutSpec::at_or_none(s.key, self.c.attention_probs_dropout_prob, attention),
            out_drop: DropoutSpec::at(s.key, self.c.hidden_dropout_prob, output),
        }
    }

    fn scratch(&self) -> AttentionScratch<'_> {
        let t = self.own;
        AttentionScratch {
            sub: &t.sub,
            d_ctx: &t.d_ctx,
            dq: &t.dq,
            dk: &t.dk,
            dv: &t.dv,
            delta: &t.delta,
            ln: LayerNormScratch { partials: &t.ln_partials, colsum: Some(&t.colsum) },
            colsum: &t.colsum,
        }
    }
}

impl LayerHook for TopHook<'_> {
    /// Replaces the sequence output hidden[L] by up(blocks(down(hidden[L]))), keeping
    /// hidden[L] in `input`.
    fn sequence_output(&self, rec: &mut Recorder, s: &HookStep) -> Result<(), GpuError> {
        let (p, t, rows, eps) = (&self.terms.params, self.own, s.acts.rows(), self.c.layer_norm_eps);
        let sequence = &s.acts.hidden[self.c.num_hidden_layers];
        copy(rec, sequence, &t.input)?;
        p.down.forward(rec, rows, &t.input, &t.xs[0])?;
        for (i, (block, x)) in p.blocks.iter().zip(&t.blocks).enumerate() {
            block.attend(rec, &self.step(s, i), &t.xs[i], x)?;
            block.normalize(rec, eps, &t.xs[i], x, &t.xs[i + 1])?;
        }
        p.up.forward(rec, rows, &t.xs[p.blocks.len()], sequence)
    }

    /// The top's gradients from d(sequence output) in grad_x; leaves d(last layer's output)
    /// there. Each parameter serves once: its gradient is overwritten.
    fn sequence_output_backward(&self, rec: &mut Recorder, s: &HookStep) -> Result<(), GpuError> {
        let (p, g, t) = (&self.terms.params, grads_of(&self.terms.grads, "top-attn")?, self.own);
        let (rows, e, eps, n) = (s.acts.rows(), s.acts, self.c.layer_norm_eps, p.blocks.len());
        // d of a block's output in d_out, of its input in d_in; they swap after each block.
        let (mut d_out, mut d_in) = (&t.d_a, &t.d_b);
        let to_out = Some((d_out, Epilogue::None));
        p.up.backward(rec, rows, &t.xs[n], &e.grad_x, (&g.up, GradMode::Overwrite), to_out, &e.colsum)?;
        for i in (0..n).rev() {
            let (block, saved, scratch) = (&p.blocks[i], (&t.xs[i], &t.blocks[i]), self.scratch());
            // xs[i + 1] = LN(out + xs[i]): d out = d xs[i] through the residual, into d_in.
            let step = self.step(s, i);
            let through = step.out_drop.map(|drop| (drop, scratch.sub));
            let d_proj =
                block.normalize_backward(rec, eps, &g.blocks[i], saved, d_out, d_in, &scratch.ln, through)?;
            block.attend_backward(rec, &step, &g.blocks[i], saved, d_proj, d_in, &scratch)?;
            std::mem::swap(&mut d_out, &mut d_in);
        }
        let to_x = Some((&e.grad_x, Epilogue::None));
        p.down.backward(rec, rows, &t.input, d_out, (&g.down, GradMode::Overwrite), to_x, &t.colsum)
    }
}
