//! LayerNorm with an optional fused residual add, forward and backward: shaders/layernorm.wgsl.
//! `dropout_residual_layernorm_*` also fuse the dropout of a sublayer's output in front of
//! the residual add: LN(Dropout(x) + residual), reading x once.
//!
//! The backward takes the same `x` and `residual` as the forward and recomputes their sum
//! (regenerating the dropout mask), so nothing beyond the per-row mean and rstd is stored.

use super::elementwise::DropoutSpec;
use super::reduce::{colsum_rows_in, colsum_scratch_len, rows_of};
use super::{expect_len, expect_shape, to_u32};
use crate::gpu::{Binding, Gpu, GpuError, KernelSpec, Recorder, Tensor, spread};

/// Rows one backward workgroup owns; must match ROWS_PER_GROUP in layernorm.wgsl.
const ROWS_PER_GROUP: usize = 8;

const SOURCE: &str =
    concat!(include_str!("../../shaders/rng.wgsl"), include_str!("../../shaders/layernorm.wgsl"));
const FORWARD: KernelSpec = KernelSpec {
    name: "layernorm_forward",
    source: SOURCE,
    entry: "layernorm_forward",
    bindings: &[
        Binding::Read,  // x
        Binding::Read,  // residual
        Binding::Read,  // gamma
        Binding::Read,  // beta
        Binding::Write, // y
        Binding::Write, // mean
        Binding::Write, // rstd
    ],
    trusted: false,
};
const BACKWARD: KernelSpec = KernelSpec {
    name: "layernorm_backward",
    source: SOURCE,
    entry: "layernorm_backward",
    bindings: &[
        Binding::Read,  // x
        Binding::Read,  // residual
        Binding::Read,  // gamma
        Binding::Read,  // dy
        Binding::Read,  // mean
        Binding::Read,  // rstd
        Binding::Write, // dx
        Binding::Write, // partials
    ],
    trusted: false,
};
const DROPOUT_BACKWARD: KernelSpec = KernelSpec {
    name: "layernorm_dropout_backward",
    source: SOURCE,
    entry: "layernorm_dropout_backward",
    bindings: &[
        Binding::Read,  // x
        Binding::Read,  // residual
        Binding::Read,  // gamma
        Binding::Read,  // dy
        Binding::Read,  // mean
        Binding::Read,  // rstd
        Binding::Write, // dx
        Binding::Write, // partials
        Binding::Write, // d_input
    ],
    trusted: false,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    eps: f32,
    groups: u32,
    seed: u32,
    stream: u32,
    threshold: u32,
    scale: f32,
    first_index: u32,
}

impl Params {
    fn new(
        op: &str,
        m: usize,
        n: usize,
        eps: f32,
        groups: usize,
        drop: Option<DropoutSpec>,
    ) -> Result<Params, GpuError> {
        let drop = drop.unwrap_or(DropoutSpec::NONE);
        Ok(Params {
            m: to_u32(op, "rows", m)?,
            n: to_u32(op, "columns", n)?,
            eps,
            groups: to_u32(op, "workgroups", groups)?,
            seed: drop.seed,
            stream: drop.stream,
            threshold: drop.threshold(),
            scale: drop.scale(),
            first_index: drop.first_index(m * n),
        })
    }
}

/// The layer: gamma and beta [N], and eps (1e-12 for BERT).
#[derive(Clone, Copy)]
pub struct LayerNorm<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f32,
    /// Invocations per row (a power of two); None: [`row_width`]'s choice for the adapter.
    pub width: Option<u32>,
}

impl<'a> LayerNorm<'a> {
    pub fn new(gamma: &'a Tensor, beta: &'a Tensor, eps: f32) -> LayerNorm<'a> {
        LayerNorm { gamma, beta, eps, width: None }
    }
}

/// Invocations per row for rows of `n`. GPUs: as wide as the row within 32..256, so narrow
/// rows waste none and the tree reductions take fewer barriers. CPU adapters: one SIMD
/// vector (the subgroup). lavapipe runs a workgroup's vectors one after another and
/// switches between them at every barrier, which made the 256-wide LayerNorm of a MiniLM
/// step's [1024, 384] rows 4–7× slower than 8 wide (24.5 against 3.5 ms forward, 24.2
/// against 7.6 ms backward in one run of tests/layernorm.rs's timing).
pub fn row_width(gpu: &Gpu, n: usize) -> u32 {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return gpu.info.subgroup_max_size.clamp(8, 64).next_power_of_two();
    }
    n.next_power_of_two().clamp(32, 256) as u32
}

/// What the forward saves for the backward: per-row mean and 1 / std, each [M].
#[derive(Clone, Copy)]
pub struct LayerNormStats<'a> {
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
}

/// The backward's outputs: dx [M, N] (also the residual's gradient), dgamma and dbeta [N].
#[derive(Clone, Copy)]
pub struct LayerNormGrads<'a> {
    pub dx: &'a Tensor,
    pub dgamma: &'a Tensor,
    pub dbeta: &'a Tensor,
}

/// The fused input of `dropout_residual_layernorm_*`: s = Dropout(x) + residual.
#[derive(Clone, Copy)]
pub struct DropoutResidual<'a> {
    /// The sublayer's output before dropout [.., N].
    pub x: &'a Tensor,
    pub dropout: DropoutSpec,
    /// Same shape as x.
    pub residual: &'a Tensor,
}

/// Checks the input and the layer; returns (M, N) and the residual binding plus the defines.
/// `input_dropout`: the kernel passes x through dropout (HAS_DROPOUT).
fn check<'t>(
    gpu: &Gpu,
    op: &str,
    ln: &LayerNorm,
    x: &'t Tensor,
    residual: Option<&'t Tensor>,
    input_dropout: bool,
    stats: &LayerNormStats,
) -> Result<(usize, usize, &'t Tensor, String), GpuError> {
    let n = ln.gamma.len();
    if n == 0 {
        return Err(GpuError::Shape {
            op: op.to_string(),
            detail: format!("'{}' is empty: nothing to normalise over", ln.gamma.name),
        });
    }
    expect_shape(op, ln.gamma, &[n])?;
    expect_shape(op, ln.beta, &[n])?;
    let m = rows_of(op, x, n)?;
    expect_len(op, stats.mean, m)?;
    expect_len(op, stats.rstd, m)?;
    let width = ln.width.unwrap_or_else(|| row_width(gpu, n));
    if !width.is_power_of_two() || width > gpu.limits.max_compute_invocations_per_workgroup {
        return Err(GpuError::Shape {
            op: op.to_string(),
            detail: format!("{width} invocations per row: not a power of two the adapter can run"),
        });
    }
    let bound = match residual {
        Some(r) => {
            expect_shape(op, r, &x.shape)?;
            r
        }
        None => x,
    };
    let defines = format!(
        "const HAS_RESIDUAL: bool = {};\nconst HAS_DROPOUT: bool = {};\nconst WG: u32 = {width}u;\n",
        residual.is_some(),
        input_dropout
    );
    Ok((m, n, bound, defines))
}

/// y = LayerNorm(x + residual) with gamma and beta over the last dimension N of x [.., N];
/// writes the per-row mean and rstd for the backward.
pub fn layernorm_forward(
    rec: &mut Recorder,
    ln: &LayerNorm,
    x: &Tensor,
    residual: Option<&Tensor>,
    y: &Tensor,
    stats: &LayerNormStats,
) -> Result<(), GpuError> {
    forward(rec, ln, x, residual, None, y, stats)
}

/// y = LayerNorm(Dropout(x) + residual): the dropped x is never stored; writes the per-row
/// mean and rstd for the backward.
pub fn dropout_residual_layernorm_forward(
    rec: &mut Recorder,
    ln: &LayerNorm,
    input: &DropoutResidual,
    y: &Tensor,
    stats: &LayerNormStats,
) -> Result<(), GpuError> {
    forward(rec, ln, input.x, Some(input.residual), Some(input.dropout), y, stats)
}

fn forward(
    rec: &mut Recorder,
    ln: &LayerNorm,
    x: &Tensor,
    residual: Option<&Tensor>,
    drop: Option<DropoutSpec>,
    y: &Tensor,
    stats: &LayerNormStats,
) -> Result<(), GpuError> {
    let op = FORWARD.name;
    let (m, n, residual, defines) = check(rec.gpu, op, ln, x, residual, drop.is_some(), stats)?;
    expect_shape(op, y, &x.shape)?;
    let params = Params::new(op, m, n, ln.eps, 0, drop)?;
    let tensors = [x, residual, ln.gamma, ln.beta, y, stats.mean, stats.rstd];
    let groups = spread(rec.gpu, params.m);
    rec.dispatch(&FORWARD, &defines, &params, &tensors, groups)
}

/// From dy and the forward's inputs and stats: dx (= d residual), dgamma and dbeta.
/// dgamma and dbeta are overwritten; allocates a [2, ceil(M / 8), N] scratch.
pub fn layernorm_backward(
    rec: &mut Recorder,
    ln: &LayerNorm,
    x: &Tensor,
    residual: Option<&Tensor>,
    stats: &LayerNormStats,
    dy: &Tensor,
    grads: &LayerNormGrads,
) -> Result<(), GpuError> {
    let (m, n, _, _) = check(rec.gpu, BACKWARD.name, ln, x, residual, false, stats)?;
    let partials = rec.gpu.zeros("layernorm partials", &[backward_scratch_len(m, n).0])?;
    let scratch = LayerNormScratch { partials: &partials, colsum: None };
    layernorm_backward_with_scratch(rec, ln, x, residual, stats, dy, grads, &scratch)
}

/// Preallocated scratch for [`layernorm_backward_with_scratch`].
#[derive(Clone, Copy)]
pub struct LayerNormScratch<'a> {
    /// At least `backward_scratch_len(M, N).0` elements: the per-block partial sums.
    pub partials: &'a Tensor,
    /// At least `backward_scratch_len(M, N).1` elements (their column sum's partials);
    /// `None` allocates when needed (past 2048 rows).
    pub colsum: Option<&'a Tensor>,
}

/// Elements of (partials, colsum scratch) the backward of x [m, n] needs.
pub fn backward_scratch_len(m: usize, n: usize) -> (usize, usize) {
    let groups = m.div_ceil(ROWS_PER_GROUP);
    (2 * groups * n, colsum_scratch_len(groups, n))
}

/// `layernorm_backward` with preallocated scratch, so that a training step does not allocate.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_with_scratch(
    rec: &mut Recorder,
    ln: &LayerNorm,
    x: &Tensor,
    residual: Option<&Tensor>,
    stats: &LayerNormStats,
    dy: &Tensor,
    grads: &LayerNormGrads,
    scratch: &LayerNormScratch,
) -> Result<(), GpuError> {
    let input = BackwardInput { x, residual, dropout: None, x_dropped: false };
    backward(rec, ln, input, stats, dy, grads, scratch)
}

/// The backward of [`dropout_residual_layernorm_forward`]: `grads.dx` gets the gradient of
/// s (also the residual's), `d_input` the gradient of x before dropout (the same mask).
#[allow(clippy::too_many_arguments)]
pub fn dropout_residual_layernorm_backward(
    rec: &mut Recorder,
    ln: &LayerNorm,
    input: &DropoutResidual,
    stats: &LayerNormStats,
    dy: &Tensor,
    grads: &LayerNormGrads,
    d_input: &Tensor,
    scratch: &LayerNormScratch,
) -> Result<(), GpuError> {
    let dropout = Some((input.dropout, d_input));
    let input = BackwardInput { x: input.x, residual: Some(input.residual), dropout, x_dropped: false };
    backward(rec, ln, input, stats, dy, grads, scratch)
}

/// The backward of `layernorm_forward(x, residual)`: what `layernorm_backward_with_scratch`
/// writes. With `through` = (drop, d_input), x = Dropout(x0) was stored already dropped (a
/// matmul's dropout epilogue), and the same pass also writes d_input = Dropout(dx) with
/// `drop`'s mask, the gradient of x0: no separate dropout pass reads dx back.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_backward(
    rec: &mut Recorder,
    ln: &LayerNorm,
    (x, residual): (&Tensor, &Tensor),
    stats: &LayerNormStats,
    dy: &Tensor,
    grads: &LayerNormGrads,
    through: Option<(DropoutSpec, &Tensor)>,
    scratch: &LayerNormScratch,
) -> Result<(), GpuError> {
    let input = BackwardInput { x, residual: Some(residual), dropout: through, x_dropped: true };
    backward(rec, ln, input, stats, dy, grads, scratch)
}

/// What a backward pass reads and, with dropout, where the gradient before dropout goes.
struct BackwardInput<'a> {
    x: &'a Tensor,
    residual: Option<&'a Tensor>,
    /// The mask, and d_input = Dropout(dx).
    dropout: Option<(DropoutSpec, &'a Tensor)>,
    /// x is stored after dropout: the kernel reads it as it is and only d_input uses the mask.
    x_dropped: bool,
}

fn backward(
    rec: &mut Recorder,
    ln: &LayerNorm,
    BackwardInput { x, residual, dropout, x_dropped }: BackwardInput,
    stats: &LayerNormStats,
    dy: &Tensor,
    grads: &LayerNormGrads,
    scratch: &LayerNormScratch,
) -> Result<(), GpuError> {
    let spec = if dropout.is_some() { &DROPOUT_BACKWARD } else { &BACKWARD };
    let op = spec.name;
    let drop = dropout.map(|(d, _)| d);
    let input_dropout = drop.is_some() && !x_dropped;
    let (m, n, residual, defines) = check(rec.gpu, op, ln, x, residual, input_dropout, stats)?;
    expect_shape(op, dy, &x.shape)?;
    expect_shape(op, grads.dx, &x.shape)?;
    expect_shape(op, grads.dgamma, &[n])?;
    expect_shape(op, grads.dbeta, &[n])?;
    let groups = m.div_ceil(ROWS_PER_GROUP);
    let partials = scratch.partials;
    if partials.len() < 2 * groups * n {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: format!(
                "scratch '{}' has {} elements, needs {}",
                partials.name,
                partials.len(),
                2 * groups * n
            ),
        });
    }
    let params = Params::new(op, m, n, ln.eps, groups, drop)?;
    let mut tensors = vec![x, residual, ln.gamma, dy, stats.mean, stats.rstd, grads.dx, partials];
    if let Some((_, d_input)) = dropout {
        expect_shape(op, d_input, &x.shape)?;
        tensors.push(d_input);
    }
    let dispatch = spread(rec.gpu, params.groups);
    rec.dispatch(spec, &defines, &params, &tensors, dispatch)?;
    colsum_rows_in(rec, partials, 0, groups, n, grads.dgamma, false, scratch.colsum)?;
    colsum_rows_in(rec, partials, groups * n, groups, n, grads.dbeta, false, scratch.colsum)
}
