//! `pals` on the CPU: the function model/tasks/pals.rs computes (formulas there).

use super::{Linear, TaskParams, add, gelu, gelu_backward};
use crate::contract::{AttentionShape, DropoutSpec, Site, site};
use crate::reference::attention;
use crate::reference::bert::{Grads, HookContext, LayerHook};

pub struct Pals<'a> {
    pub p: TaskParams<'a>,
    pub dim: usize,
    pub heads: usize,
}

/// What the PAL forward computes, for its backward.
pub(crate) struct PalCache {
    enc: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    ctx: Vec<f64>,
    pre: Vec<f64>,
}

impl Pals<'_> {
    pub(crate) fn pal_attention(&self, ctx: &HookContext) -> (AttentionShape, f64, DropoutSpec) {
        let (dim, heads) = (self.dim, self.heads);
        let shape = AttentionShape { batch: ctx.batch, seq: ctx.seq, heads, head_dim: dim / heads };
        let p = self.p.config.attention_probs_dropout_prob;
        let drop = self.p.dropout_spec(ctx, site(ctx.layer, Site::TaskSpecific), p);
        (shape, 1.0 / ((dim / heads) as f64).sqrt(), drop)
    }

    fn pal_layer(&self, l: usize) -> [Linear; 3] {
        ["query", "key", "value"].map(|w| self.p.linear(&format!("pal.layer.{l}.{w}")))
    }

    pub(crate) fn pal_forward(&self, ctx: &HookContext, h: &[f64]) -> PalCache {
        let rows = ctx.rows();
        let enc = self.p.linear("pal.encoder").forward(h, rows);
        let [q, k, v] = self.pal_layer(ctx.layer).map(|p| p.forward(&enc, rows));
        let (shape, scale, drop) = self.pal_attention(ctx);
        let (attn, _) = attention::forward_f64(&shape, &q, &k, &v, ctx.mask, scale, &drop);
        let pre = self.p.linear("pal.decoder").forward(&attn, rows);
        PalCache { enc, q, k, v, ctx: attn, pre }
    }

    /// Stores PALs' gradients (V^E and V^D summed over layers); returns d h.
    pub(crate) fn pal_backward(
        &self,
        ctx: &HookContext,
        h: &[f64],
        d_term: &[f64],
        g: &mut Grads,
    ) -> Vec<f64> {
        let rows = ctx.rows();
        let c = self.pal_forward(ctx, h);
        let d_pre = gelu_backward(&c.pre, d_term);
        let d_ctx = self.p.linear("pal.decoder").backward(&c.ctx, &d_pre, rows, g);
        let (shape, scale, drop) = self.pal_attention(ctx);
        let (dq, dk, dv) = attention::backward_f64(&shape, &c.q, &c.k, &c.v, ctx.mask, &d_ctx, scale, &drop);
        let mut d_enc = vec![0.0; c.enc.len()];
        for (p, dy) in self.pal_layer(ctx.layer).iter().zip([dq, dk, dv]) {
            d_enc = add(&d_enc, &p.backward(&c.enc, &dy, rows, g));
        }
        self.p.linear("pal.encoder").backward(h, &d_enc, rows, g)
    }
}

impl LayerHook for Pals<'_> {
    fn ffn_term(&self, ctx: &HookContext, h: &[f64], _a: &[f64]) -> Option<Vec<f64>> {
        Some(gelu(&self.pal_forward(ctx, h).pre))
    }

    fn ffn_term_backward(
        &self,
        ctx: &HookContext,
        h: &[f64],
        _a: &[f64],
        d: &[f64],
        g: &mut Grads,
    ) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
        (Some(self.pal_backward(ctx, h, d, g)), None)
    }
}
