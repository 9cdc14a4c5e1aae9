//! `low-rank` on the CPU: the function model/tasks/low_rank.rs computes (formulas there).

use super::{Linear, TaskParams};
use crate::reference::bert::{Grads, HookContext, LayerHook};

pub struct LowRank<'a> {
    pub p: TaskParams<'a>,
}

impl LowRank<'_> {
    fn layer(&self, l: usize) -> (Linear, Linear) {
        (
            self.p.linear(&format!("low_rank.layer.{l}.encoder")),
            self.p.linear(&format!("low_rank.layer.{l}.decoder")),
        )
    }
}

impl LayerHook for LowRank<'_> {
    fn ffn_term(&self, ctx: &HookContext, h: &[f64], _a: &[f64]) -> Option<Vec<f64>> {
        Some(super::bottleneck_forward(ctx, h, self.layer(ctx.layer)))
    }

    fn ffn_term_backward(
        &self,
        ctx: &HookContext,
        h: &[f64],
        _a: &[f64],
        d: &[f64],
        g: &mut Grads,
    ) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
        (Some(super::bottleneck_backward(ctx, h, d, self.layer(ctx.layer), g)), None)
    }
}
