//! Gradient norms, clip coefficients and the fused AdamW / BERTAdam update:
//! shaders/optimizer.wgsl.
//!
//! A step with clipping, for gradient tensors g_0..g_{T-1} (one buffer each):
//! `sum_squares(g_t, partials, norms, t)` for every t, then `clip_coefficients(norms, coef)`,
//! then `adam_step(.., coef, t, ..)` for every t, then `update_scaler` (step counts and the
//! loss scale). Nothing is read back to the host: a step whose scaled gradients overflowed
//! is skipped on the GPU.

use super::{expect_len, expect_shader_f16, to_u32};
use crate::gpu::{Binding, ElementType, Gpu, GpuError, KernelSpec, Recorder, Tensor, spread};

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
    trusted: false,
};
const SUM_SQUARES_FINAL: KernelSpec = KernelSpec {
    name: "sum_squares_final",
    source: SOURCE,
    entry: "sum_squares_final",
    bindings: READ_WRITE,
    trusted: false,
};
const CLIP_COEFFICIENTS: KernelSpec = KernelSpec {
    name: "clip_coefficients",
    source: SOURCE,
    entry: "clip_coefficients",
    bindings: &[Binding::Read, Binding::Write, Binding::Read],
    trusted: false,
};
const ADAM_STEP: KernelSpec = KernelSpec {
    name: "adam_step",
    source: SOURCE,
    entry: "adam_step",
    bindings: &[
        Binding::Read,
        Binding::Read,
        Binding::Read,
        Binding::Read,
        Binding::Write,
        Binding::Write,
        Binding::Write,
        Binding::Write,
    ],
    trusted: false,
};

/// The storage of adam_step's f16 copy and its vector width (shaders/optimizer.wgsl):
/// every kernel but adam_step is compiled with NO_HALF_COPY.
const NO_HALF_COPY: &str =
    "alias HALF = f32;\nconst WRITE_HALF: bool = false;\nalias V = f32;\nalias HV = HALF;\n";

fn adam_defines(half_copy: bool, vec4: bool) -> String {
    let half = if half_copy {
        "enable f16;\nalias HALF = f16;\nconst WRITE_HALF: bool = true;\n"
    } else {
        "alias HALF = f32;\nconst WRITE_HALF: bool = false;\n"
    };
    let width = if vec4 {
        "alias V = vec4<f32>;\nalias HV = vec4<HALF>;\n"
    } else {
        "alias V = f32;\nalias HV = HALF;\n"
    };
    format!("{half}{width}")
}
const UPDATE_SCALER: KernelSpec = KernelSpec {
    name: "update_scaler",
    source: SOURCE,
    entry: "update_scaler",
    bindings: &[Binding::Read, Binding::Read, Binding::Write, Binding::Write, Binding::Write],
    trusted: false,
};

/// Workgroups of the first sum-of-squares stage at most, and so the length the `partials`
/// scratch tensor must have at least. 1024 × 256 threads fill a large GPU; a 23M-element
/// tensor then costs each thread ~88 loads.
pub const NORM_PARTIALS: usize = 1024;

/// Elements one thread of the first stage takes at least before more workgroups are used:
/// few on GPUs, which want many workgroups; many on CPU adapters, where each workgroup's
/// 256-wide tree sum costs a switch between its 32 SIMD vectors at every barrier (a MiniLM
/// step's gradient norms took most of the optimizer's time on lavapipe at 4 a thread).
fn elements_per_thread(gpu: &Gpu) -> usize {
    if gpu.info.device_type == wgpu::DeviceType::Cpu { 256 } else { 4 }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    n: u32,
    groups: u32,
    slot: u32,
    mode: u32,
    max_norm: f32,
    scaling: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamParams {
    n: u32,
    slot: u32,
    found: u32,
    index: u32,
    corrections: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ScalerParams {
    ids: u32,
    found: u32,
    slot: u32,
    stride: u32,
    scaling: u32,
    interval: u32,
}

/// Bias-correction pairs beyond which we give up on a table (AdamW's β2 = 0.999 needs
/// about 17,300: from there both corrections round to 1 in f32).
const MAX_CORRECTIONS: usize = 1 << 20;

/// (1 − β1^t, 1 − β2^t) for t = 1, 2, … as the host computes them (f64 rounded to f32),
/// flattened, up to the first t where both are 1: what `adam_step` reads, so the GPU can
/// count steps itself (a skipped step does not advance them) and still match the host.
/// Empty without bias correction.
pub fn bias_correction_table(cfg: &AdamConfig) -> Result<Vec<f32>, GpuError> {
    let mut table = Vec::new();
    if !cfg.bias_correction {
        return Ok(table);
    }
    for t in 1..=MAX_CORRECTIONS as u32 {
        let (bc1, bc2) = cfg.bias_corrections(t);
        if bc1 == 1.0 && bc2 == 1.0 {
            return Ok(table);
        }
        table.extend([bc1, bc2]);
    }
    let detail = format!("betas {} and {} need over {MAX_CORRECTIONS} corrections", cfg.beta1, cfg.beta2);
    Err(GpuError::Shape { op: "bias_correction_table".into(), detail })
}

/// Where `adam_step` finds a tensor's step count and the bias corrections, on the GPU.
pub struct AdamSteps<'a> {
    /// u32 [tensors]: the updates each tensor has had (advanced by `update_scaler`).
    pub counts: &'a Tensor,
    /// This tensor's entry in `counts`.
    pub index: u32,
    /// `bias_correction_table`'s values (one element when it is empty).
    pub corrections: &'a Tensor,
    /// Pairs in the table.
    pub pairs: u32,
}

/// Dynamic loss scaling as PyTorch's GradScaler: gradients arrive multiplied by the scale;
/// a step with an inf or NaN among them is skipped and halves the scale; `growth_interval`
/// clean steps in a row double it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaling {
    pub init_scale: f32,
    pub growth_interval: u32,
}

impl Default for LossScaling {
    /// GradScaler's defaults: 2^16, doubled after 2000 clean steps.
    fn default() -> Self {
        LossScaling { init_scale: 65536.0, growth_interval: 2000 }
    }
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
    let groups = grad.len().div_ceil(256 * elements_per_thread(rec.gpu)).clamp(1, NORM_PARTIALS);
    let params = NormParams {
        n: to_u32(op, "n", grad.len())?,
        groups: groups as u32,
        slot,
        mode: 0,
        max_norm: 0.0,
        scaling: 0,
    };
    let first = [groups as u32, 1, 1];
    rec.dispatch(&SUM_SQUARES_PARTIAL, NO_HALF_COPY, &params, &[grad, partials], first)?;
    rec.dispatch(&SUM_SQUARES_FINAL, NO_HALF_COPY, &params, &[partials, norms], [1, 1, 1])
}

/// From squared norms [T] of gradients scaled by S = scaler[0] to clip factors that also
/// unscale: coef[t] for t < T per `mode`, divided by S; coef[T] = the unscaled global norm
/// √(Σ norms) / S (in every mode, for logging); coef[T + 1] = 1 when `scaling` and that norm
/// is not finite (the step is then skipped), else 0.
pub fn clip_coefficients(
    rec: &mut Recorder,
    norms: &Tensor,
    coef: &Tensor,
    scaler: &Tensor,
    max_norm: f32,
    mode: ClipMode,
    scaling: bool,
) -> Result<(), GpuError> {
    let op = "clip_coefficients";
    expect_len(op, coef, norms.len() + 2)?;
    expect_len(op, scaler, 2)?;
    let params = NormParams {
        n: to_u32(op, "tensors", norms.len())?,
        groups: 0,
        slot: 0,
        mode: mode.code(),
        max_norm,
        scaling: scaling as u32,
    };
    rec.dispatch(&CLIP_COEFFICIENTS, NO_HALF_COPY, &params, &[norms, coef, scaler], [1, 1, 1])
}

/// One fused Adam update of `param`, `m` and `v` in place from `grad` × coef[slot]:
/// param −= lr·(update + weight_decay·param), at the step count `steps` holds + 1. Nothing
/// changes when coef's last element (`clip_coefficients`' found flag) is not 0. Pass
/// weight_decay 0 for tensors that are not decayed (biases, LayerNorm). `half_copy` (f16,
/// like `param`) gets the updated values rounded to f16 in the same pass.
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
    steps: &AdamSteps,
    cfg: &AdamConfig,
    half_copy: Option<&Tensor>,
) -> Result<(), GpuError> {
    let op = "adam_step";
    for tensor in [grad, m, v] {
        expect_len(op, tensor, param.len())?;
    }
    if let Some(copy) = half_copy {
        copy.expect_type(op, ElementType::F16)?;
        expect_shader_f16(op, rec.gpu)?;
        if copy.len() != param.len() {
            let detail = format!(
                "f16 copy '{}' has {} elements, '{}' {}",
                copy.name,
                copy.len(),
                param.name,
                param.len()
            );
            return Err(GpuError::Shape { op: op.into(), detail });
        }
    }
    expect_slot(op, coef, slot)?;
    expect_slot(op, steps.counts, steps.index)?;
    if steps.corrections.len() < 2 * steps.pairs as usize {
        let detail = format!("'{}' holds fewer than {} pairs", steps.corrections.name, steps.pairs);
        return Err(GpuError::Shape { op: op.into(), detail });
    }
    // Four elements an invocation where the tensor allows it (each tensor is its own
    // buffer, so only the length matters).
    let vec4 = param.len().is_multiple_of(4);
    let n = to_u32(op, "n", if vec4 { param.len() / 4 } else { param.len() })?;
    let params = AdamParams {
        n,
        slot,
        found: to_u32(op, "coef", coef.len() - 1)?,
        index: steps.index,
        corrections: steps.pairs,
        lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay,
    };
    let groups = spread(rec.gpu, n.div_ceil(256));
    let defines = adam_defines(half_copy.is_some(), vec4);
    let copy = half_copy.unwrap_or(param);
    let bound = [grad, coef, steps.counts, steps.corrections, param, m, v, copy];
    rec.dispatch(&ADAM_STEP, &defines, &params, &bound, groups)
}

/// Ends a step after its `adam_step`s: unless coef's found flag is up, each `counts[ids[j]]`
/// advances by one. record[slot] gets the scale this step used and record[slot + stride]
/// its found flag (0 or 1); with `scaling`, the scale and its growth counter (`scaler`
/// [S, growth]) are updated as GradScaler does.
#[allow(clippy::too_many_arguments)]
pub fn update_scaler(
    rec: &mut Recorder,
    coef: &Tensor,
    ids: &Tensor,
    counts: &Tensor,
    scaler: &Tensor,
    record: &Tensor,
    slot: u32,
    stride: u32,
    scaling: Option<LossScaling>,
) -> Result<(), GpuError> {
    let op = "update_scaler";
    expect_len(op, scaler, 2)?;
    expect_slot(op, record, slot + stride)?;
    let params = ScalerParams {
        ids: to_u32(op, "ids", ids.len())?,
        found: to_u32(op, "coef", coef.len() - 1)?,
        slot,
        stride,
        scaling: scaling.is_some() as u32,
        interval: scaling.map_or(0, |s| s.growth_interval),
    };
    rec.dispatch(&UPDATE_SCALER, NO_HALF_COPY, &params, &[coef, ids, counts, scaler, record], [1, 1, 1])
}
