//! `top-attn` on the CPU: the function model/tasks/top_attn.rs computes (formulas there).

use super::{Linear, TaskParams, accumulate, add, dropout};
use crate::contract::{AttentionShape, DropoutSpec, top_dropout_sites};
use crate::reference::bert::{Grads, HookContext, LayerHook};
use crate::reference::{attention, layernorm};

pub struct TopAttn<'a> {
    pub p: TaskParams<'a>,
    pub dim: usize,
    pub heads: usize,
    pub blocks: usize,
}

/// What one top-attn block's forward computes, for its backward.
pub(crate) struct TopBlockCache {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    ctx: Vec<f64>,
    /// The LayerNorm's input: Dropout(ctx·W_Oᵀ + b_O) + the block input.
    s: Vec<f64>,
}

/// The top's forward: block inputs xs (xs[n] is the up-projection's input), the blocks'
/// caches and the output.
pub(crate) struct TopCache {
    xs: Vec<Vec<f64>>,
    blocks: Vec<TopBlockCache>,
    pub(crate) out: Vec<f64>,
}

impl TopAttn<'_> {
    /// Block i's parameters: [query, key, value], output, and the LayerNorm's name.
    fn top_block(&self, i: usize) -> ([Linear; 3], Linear, String) {
        let name = |which: &str| format!("top.block.{i}.{which}");
        (
            ["query", "key", "value"].map(|w| self.p.linear(&name(w))),
            self.p.linear(&name("output")),
            name("LayerNorm"),
        )
    }

    /// Block i's (attention shape, scale, attention dropout, output dropout).
    pub(crate) fn top_attention(
        &self,
        ctx: &HookContext,
        i: usize,
    ) -> (AttentionShape, f64, DropoutSpec, DropoutSpec) {
        let (dim, heads) = (self.dim, self.heads);
        let shape = AttentionShape { batch: ctx.batch, seq: ctx.seq, heads, head_dim: dim / heads };
        let (attention, output) = top_dropout_sites(self.p.config.num_hidden_layers, i);
        let c = self.p.config;
        let attention = self.p.dropout_spec(ctx, attention, c.attention_probs_dropout_prob);
        let output = self.p.dropout_spec(ctx, output, c.hidden_dropout_prob);
        (shape, 1.0 / (shape.head_dim as f64).sqrt(), attention, output)
    }

    pub(crate) fn top_forward(&self, ctx: &HookContext, h: &[f64]) -> TopCache {
        let blocks = self.blocks;
        let (rows, eps) = (ctx.rows(), self.p.config.layer_norm_eps);
        let mut xs = vec![self.p.linear("top.down").forward(h, rows)];
        let mut caches = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let ([wq, wk, wv], output, norm) = self.top_block(i);
            let x = &xs[i];
            let (q, k, v) = (wq.forward(x, rows), wk.forward(x, rows), wv.forward(x, rows));
            let (shape, scale, attention_drop, output_drop) = self.top_attention(ctx, i);
            let (attn, _) = attention::forward_f64(&shape, &q, &k, &v, ctx.mask, scale, &attention_drop);
            let proj = output.forward(&attn, rows);
            let s = add(&dropout(&proj, &output_drop), x);
            let gamma = self.p.vector(&format!("{norm}.weight"));
            let (y, _, _) = layernorm::forward_f64(&s, &gamma, &self.p.vector(&format!("{norm}.bias")), eps);
            caches.push(TopBlockCache { q, k, v, ctx: attn, s });
            xs.push(y);
        }
        let out = self.p.linear("top.up").forward(&xs[blocks], rows);
        TopCache { xs, blocks: caches, out }
    }

    /// Stores the top's gradients; returns d h.
    pub(crate) fn top_backward(
        &self,
        ctx: &HookContext,
        h: &[f64],
        d_out: &[f64],
        g: &mut Grads,
    ) -> Vec<f64> {
        let (rows, eps) = (ctx.rows(), self.p.config.layer_norm_eps);
        let c = self.top_forward(ctx, h);
        let mut d_x = self.p.linear("top.up").backward(&c.xs[c.blocks.len()], d_out, rows, g);
        for (i, block) in c.blocks.iter().enumerate().rev() {
            let ([wq, wk, wv], output, norm) = self.top_block(i);
            let gamma = self.p.vector(&format!("{norm}.weight"));
            let (d_s, d_gamma, d_beta) = layernorm::backward_f64(&block.s, &gamma, &d_x, eps);
            accumulate(g, &format!("{}{norm}.weight", self.p.prefix), d_gamma);
            accumulate(g, &format!("{}{norm}.bias", self.p.prefix), d_beta);
            let (shape, scale, attention_drop, output_drop) = self.top_attention(ctx, i);
            let d_attn = output.backward(&block.ctx, &dropout(&d_s, &output_drop), rows, g);
            let (b, mask) = (block, ctx.mask);
            let (dq, dk, dv) =
                attention::backward_f64(&shape, &b.q, &b.k, &b.v, mask, &d_attn, scale, &attention_drop);
            d_x = d_s;
            for (w, dy) in [(wq, dq), (wk, dk), (wv, dv)] {
                d_x = add(&d_x, &w.backward(&c.xs[i], &dy, rows, g));
            }
        }
        self.p.linear("top.down").backward(h, &d_x, rows, g)
    }
}

impl LayerHook for TopAttn<'_> {
    fn sequence_output(&self, ctx: &HookContext, h: &[f64]) -> Option<Vec<f64>> {
        Some(self.top_forward(ctx, h).out)
    }

    fn sequence_output_backward(
        &self,
        ctx: &HookContext,
        h: &[f64],
        d_sequence: &[f64],
        g: &mut Grads,
    ) -> Option<Vec<f64>> {
        Some(self.top_backward(ctx, h, d_sequence, g))
    }
}
