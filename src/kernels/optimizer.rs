//! Gradient norms, clip coefficients and the fused AdamW / BERTAdam update:
//! shaders/optimizer.wgsl.
//!
//! A step with clipping, for gradient tensors g_0..g_{T-1} (one buffer each):
//! `sum_squares(g_t, partials, norms, t)` for every t, then `clip_coefficients(norms, coef)`,
//! then `adam_step(.., coef, t, ..)` for every t. Nothing is read back to the host.

use super::{expect_len, to_u32};
use crate::gpu::{Binding, GpuError, KernelSpec, Recorder, Tensor, spread};

const SOURCE: &str = concat!(
    include_str!("../../shaders/workgroup_reduce.wgsl"),
    include_str!("../../shaders/optimizer.wgsl")
);
const READ_WRITE: &[Binding] = &[Binding::Read, Binding::Write];

const SUM_SQUARES_PARTIAL: KernelSpec = KernelSpec {
    name: "sum_squares_partial",
    source: SOURCE,
    entry: "sum_squares_partial",
    bindings: READ_WRITE,
};
const SUM_SQUARES_FINAL: KernelSpec = KernelSpec {
    name: "sum_squares_final",
    source: SOURCE,
    entry: "sum_squares_final",
    bindings: READ_WRITE,
};
const CLIP_COEFFICIENTS: KernelSpec = KernelSpec {
    name: "clip_coefficients",
    source: SOURCE,
    entry: "clip_coefficients",
    bindings: READ_WRITE,
};
const ADAM_STEP: KernelSpec = KernelSpec {
    name: "adam_step",
    source: SOURCE,
    entry: "adam_step",
    bindings: &[Binding::Read, Binding::Read, Binding::Write, Binding::Write, Binding::Write],
};

/// Workgroups of the first sum-of-squares stage at most, and so the length the `partials`
/// scratch tensor must have at least. 1024 × 256 threads fill a large GPU; a 23M-element
/// tensor then costs each thread ~88 loads.
pub const NORM_PARTIALS: usize = 1024;

/// Elements one thread of the first stage takes at least before more workgroups are used.
const ELEMENTS_PER_THREAD: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    n: u32,
    groups: u32,
    slot: u32,
    mode: u32,
    max_norm: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamParams {
    n: u32,
    slot: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
}

pub use crate::contract::ClipMode;

impl ClipMode {
    fn code(self) -> u32 {
        match self {
            ClipMode::None => 0,
            ClipMode::Global => 1,
            ClipMode::PerTensor => 2,
        }
    }
}

pub use crate::contract::AdamConfig;

fn expect_slot(op: &str, tensor: &Tensor, slot: u32) -> Result<(), GpuError> {
    if (slot as usize) < tensor.len() {
        return Ok(());
    }
    Err(GpuError::Shape {
        op: op.to_string(),
        detail: format!("slot {slot} is outside '{}' of shape {:?}", tensor.name, tensor.shape),
    })
}

/// norms[slot] = Σ grad², in two fixed-order stages through `partials` (≥ NORM_PARTIALS
/// elements of scratch, which may be shared by all tensors of a step).
pub fn sum_squares(
    rec: &mut Recorder,
    grad: &Tensor,
    partials: &Tensor,
    norms: &Tensor,
    slot: u32,
) -> Result<(), GpuError> {
    let op = "sum_squares";
    expect_slot(op, norms, slot)?;
    if partials.len() < NORM_PARTIALS {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: format!(
                "partials '{}' has {} elements, needs at least {NORM_PARTIALS}",
                partials.name,
                partials.len()
            ),
        });
    }
    let groups = grad.len().div_ceil(256 * ELEMENTS_PER_THREAD).clamp(1, NORM_PARTIALS);
    let params =
        NormParams { n: to_u32(op, "n", grad.len())?, groups: groups as u32, slot, mode: 0, max_norm: 0.0 };
    let first = [groups as u32, 1, 1];
    rec.dispatch(&SUM_SQUARES_PARTIAL, "", &params, &[grad, partials], first)?;
    rec.dispatch(&SUM_SQUARES_FINAL, "", &params, &[partials, norms], [1, 1, 1])
}

/// From squared norms [T] to clip factors: coef[t] for t < T per `mode`, coef[T] = the
/// global norm √(Σ norms) (in every mode, for logging).
pub fn clip_coefficients(
    rec: &mut Recorder,
    norms: &Tensor,
    coef: &Tensor,
    max_norm: f32,
    mode: ClipMode,
) -> Result<(), GpuError> {
    let op = "clip_coefficients";
    expect_len(op, coef, norms.len() + 1)?;
    let params = NormParams {
        n: to_u32(op, "tensors", norms.len())?,
        groups: 0,
        slot: 0,
        mode: mode.code(),
        max_norm,
    };
    rec.dispatch(&CLIP_COEFFICIENTS, "", &params, &[norms, coef], [1, 1, 1])
}

/// One fused Adam update of `param`, `m` and `v` in place from `grad` × coef[slot]:
/// param −= lr·(update + weight_decay·param), `step` counting from 1. Pass weight_decay 0
/// for tensors that are not decayed (biases, LayerNorm).
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    rec: &mut Recorder,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    coef: &Tensor,
    slot: u32,
    lr: f32,
    weight_decay: f32,
    step: u32,
    cfg: &AdamConfig,
) -> Result<(), GpuError> {
    let op = "adam_step";
    for tensor in [grad, m, v] {
        expect_len(op, tensor, param.len())?;
    }
    expect_slot(op, coef, slot)?;
    if step == 0 && cfg.bias_correction {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: "step counts from 1 (bias correction divides by 1 - beta^step)".into(),
        });
    }
    let (bc1, bc2) = cfg.bias_corrections(step);
    let n = to_u32(op, "n", param.len())?;
    let params =
        AdamParams { n, slot, lr, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay, bc1, bc2 };
    let groups = spread(rec.gpu, n.div_ceil(256));
    rec.dispatch(&ADAM_STEP, "", &params, &[grad, coef, param, m, v], groups)
}
