//! `adapters` on the CPU: the function model/tasks/adapters.rs computes (formulas there).

use super::{Linear, TaskParams};
use crate::reference::bert::{Grads, HookContext, LayerHook};

pub struct Adapters<'a> {
    pub p: TaskParams<'a>,
}

impl Adapters<'_> {
    /// (down, up) of layer l's adapter at `site` (attention or ffn).
    fn adapter(&self, l: usize, site: &str) -> (Linear, Linear) {
        let name = |which: &str| format!("adapter.layer.{l}.{site}.{which}");
        (self.p.linear(&name("down")), self.p.linear(&name("up")))
    }
}

impl LayerHook for Adapters<'_> {
    fn attention_term(&self, ctx: &HookContext, x: &[f64]) -> Option<Vec<f64>> {
        Some(super::bottleneck_forward(ctx, x, self.adapter(ctx.layer, "attention")))
    }

    fn ffn_term(&self, ctx: &HookContext, _h: &[f64], a: &[f64]) -> Option<Vec<f64>> {
        Some(super::bottleneck_forward(ctx, a, self.adapter(ctx.layer, "ffn")))
    }

    fn attention_term_backward(
        &self,
        ctx: &HookContext,
        x: &[f64],
        d: &[f64],
        g: &mut Grads,
    ) -> Option<Vec<f64>> {
        Some(super::bottleneck_backward(ctx, x, d, self.adapter(ctx.layer, "attention"), g))
    }

    fn ffn_term_backward(
        &self,
        ctx: &HookContext,
        _h: &[f64],
        a: &[f64],
        d: &[f64],
        g: &mut Grads,
    ) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
        (None, Some(super::bottleneck_backward(ctx, a, d, self.adapter(ctx.layer, "ffn"), g)))
    }
}
