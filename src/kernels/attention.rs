//! Multi-head self-attention, forward and backward, on one of two paths:
//! - fused (shaders/attention.wgsl): flash-attention style, the S×S scores never reach
//!   memory.
//! - unfused: Q·Kᵀ, P·V and the gradients' products on the batched matmul (one (b, h) per
//!   batch), the softmax and its backward as row kernels (shaders/attention_softmax.wgsl),
//!   the scores in a workspace of at most [`workspace_limit`] bytes per matrix, or one
//!   sequence's scores where those are larger (sequences run in chunks that fit). The
//!   fused kernel's per-row loops run at ~0.2 GFLOP/s on lavapipe, where the matmul's
//!   register tiles are 10× faster, so CPU adapters take this one.
//!
//! GPUs take whichever measures faster per shape class ([`path`]): the unfused products run
//! on tensor cores where the adapter has them. Both give the same results up to f32 rounding
//! (same dropout mask, same lse).
//!
//! q, k and v may be stored f16 (mixed precision keeps these activations at half the
//! memory), all three alike; both paths widen them at each load and sum in f32. Every
//! other tensor is f32.

use super::elementwise::DropoutSpec;
use super::matmul::{self, Epilogue, InnerBatch, Matmul};
use super::{expect_count, expect_len, expect_shader_f16, storage_aliases, to_u32};
use crate::gpu::{Binding, ElementType, Gpu, GpuError, KernelSpec, Recorder, Tensor, spread, tuning_enabled};
use Binding::{Read, Write};

const SOURCE: &str =
    concat!(include_str!("../../shaders/rng.wgsl"), include_str!("../../shaders/attention.wgsl"));

const FORWARD: KernelSpec = KernelSpec {
    name: "attention_forward",
    source: SOURCE,
    entry: "attention_forward",
    bindings: &[Read, Read, Read, Read, Write, Write],
    trusted: false,
};
const DELTA: KernelSpec = KernelSpec {
    name: "attention_delta",
    source: SOURCE,
    entry: "attention_delta",
    bindings: &[Read, Read, Write],
    trusted: false,
};
const BACKWARD_DQ: KernelSpec = KernelSpec {
    name: "attention_backward_dq",
    source: SOURCE,
    entry: "attention_backward_dq",
    bindings: &[Read, Read, Read, Read, Read, Read, Read, Write],
    trusted: false,
};
const BACKWARD_DKDV: KernelSpec = KernelSpec {
    name: "attention_backward_dkdv",
    source: SOURCE,
    entry: "attention_backward_dkdv",
    bindings: &[Read, Read, Read, Read, Read, Read, Read, Write, Write],
    trusted: false,
};

const SOFTMAX_SOURCE: &str =
    concat!(include_str!("../../shaders/rng.wgsl"), include_str!("../../shaders/attention_softmax.wgsl"));
const SOFTMAX: KernelSpec = KernelSpec {
    name: "attention_softmax",
    source: SOFTMAX_SOURCE,
    entry: "attention_softmax",
    bindings: &[Read, Write, Write],
    trusted: false,
};
const SOFTMAX_BACKWARD: KernelSpec = KernelSpec {
    name: "attention_softmax_backward",
    source: SOFTMAX_SOURCE,
    entry: "attention_softmax_backward",
    bindings: &[Read, Read, Read, Write, Write],
    trusted: false,
};
/// Invocations per workgroup of the softmax kernels, WG in the shader.
const SOFTMAX_WG: u32 = 64;

/// Rows (queries or keys) per workgroup, BLOCK_Q in the shader.
const BLOCK_Q: usize = 64;
/// Largest head dimension: per-invocation register arrays are sized by it.
pub const MAX_HEAD_DIM: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    seq: u32,
    heads: u32,
    blocks: u32,
    scale: f32,
    seed: u32,
    stream: u32,
    threshold: u32,
    drop_scale: f32,
    first_index: u32,
}

pub use crate::contract::AttentionShape;

/// Keys (or queries) per shared tile: a power of two up to 64 with both tiles
/// (2 * rows * head_dim floats) within 16 KiB.
fn tile_rows(head_dim: usize) -> usize {
    let mut rows = 64;
    while rows * head_dim > 2048 {
        rows /= 2;
    }
    rows
}

/// attention.wgsl's constants, after QKV_TYPE, the storage type of q, k and v (opening
/// with the `enable f16;` a module must start with when that is f16). The delta prepass
/// binds none of them and always takes f32: one pipeline for both types.
fn defines(gpu: &Gpu, shape: AttentionShape, qkv: ElementType) -> Result<String, GpuError> {
    let types = storage_aliases("attention", gpu, &[("QKV_TYPE", qkv)])?;
    Ok(format!(
        "{types}const HEAD_DIM: u32 = {}u;\nconst BLOCK_K: u32 = {}u;\n",
        shape.head_dim,
        tile_rows(shape.head_dim)
    ))
}

/// The type q, k and v share (f32, or f16 on adapters with shader-f16), after checking
/// that each holds `shape.qkv_len()` elements.
fn expect_qkv(
    op: &str,
    gpu: &Gpu,
    shape: AttentionShape,
    qkv: [&Tensor; 3],
) -> Result<ElementType, GpuError> {
    let [q, ..] = qkv;
    for t in qkv {
        if t.dtype != q.dtype {
            let detail = format!(
                "'{}' holds {:?} elements and '{}' {:?}: q, k and v must share one type",
                q.name, q.dtype, t.name, t.dtype
            );
            return Err(GpuError::Shape { op: op.into(), detail });
        }
        expect_count(op, t, shape.qkv_len())?;
    }
    if q.dtype == ElementType::F16 {
        expect_shader_f16(op, gpu)?;
    }
    Ok(q.dtype)
}

fn params(op: &str, shape: AttentionShape, scale: f32, dropout: DropoutSpec) -> Result<Params, GpuError> {
    if shape.head_dim == 0 || shape.head_dim > MAX_HEAD_DIM {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: format!("head_dim = {} must be in 1..={MAX_HEAD_DIM}", shape.head_dim),
        });
    }
    // The dropout index ((b*H + h)*S + i)*S + j wraps like the reference's; only the
    // buffers' offsets must fit.
    to_u32(op, "elements", shape.qkv_len())?;
    Ok(Params {
        batch: to_u32(op, "batch", shape.batch)?,
        seq: to_u32(op, "seq", shape.seq)?,
        heads: to_u32(op, "heads", shape.heads)?,
        blocks: to_u32(op, "blocks", shape.seq.div_ceil(BLOCK_Q))?,
        scale,
        seed: dropout.seed,
        stream: dropout.stream,
        threshold: dropout.threshold(),
        drop_scale: dropout.scale(),
        first_index: dropout.first_index(shape.rows_len() * shape.seq),
    })
}

/// One workgroup per (b, h, block of 64 rows).
fn row_blocks(rec: &Recorder, op: &str, shape: AttentionShape) -> Result<[u32; 3], GpuError> {
    let groups = shape.batch * shape.heads * shape.seq.div_ceil(BLOCK_Q);
    Ok(spread(rec.gpu, to_u32(op, "workgroups", groups)?))
}

/// o = softmax(q·kᵀ·scale + mask) · v per head, with dropout on the probabilities; also
/// writes each row's log-sum-exp of the scaled, masked scores for the backward. Runs on
/// this adapter's [`path`].
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    rec: &mut Recorder,
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    scale: f32,
    dropout: DropoutSpec,
) -> Result<(), GpuError> {
    let path = path(rec.gpu, shape, q.dtype)?;
    attention_forward_on(path, rec, shape, q, k, v, mask, out, lse, scale, dropout)
}

/// `attention_forward` on a given path (tests run both; `pals bench` names the one it ran).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_on(
    path: AttentionPath,
    rec: &mut Recorder,
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    scale: f32,
    dropout: DropoutSpec,
) -> Result<(), GpuError> {
    let op = FORWARD.name;
    let qkv = expect_qkv(op, rec.gpu, shape, [q, k, v])?;
    expect_len(op, out, shape.qkv_len())?;
    expect_len(op, mask, shape.mask_len())?;
    expect_len(op, lse, shape.rows_len())?;
    let params = params(op, shape, scale, dropout)?;
    if shape.rows_len() == 0 {
        return Ok(());
    }
    match path {
        AttentionPath::Fused => {
            let groups = row_blocks(rec, op, shape)?;
            rec.dispatch(
                &FORWARD,
                &defines(rec.gpu, shape, qkv)?,
                &params,
                &[q, k, v, mask, out, lse],
                groups,
            )
        }
        AttentionPath::Unfused => unfused_forward(rec, shape, [q, k, v, mask, out, lse], &params),
    }
}

/// dq, dk, dv of the forward above, given its o and lse and the same scale and dropout,
/// on this adapter's [`path`]. `delta_scratch` [B, H, S] receives rowsum(dO ⊙ o).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    rec: &mut Recorder,
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_out: &Tensor,
    mask: &Tensor,
    lse: &Tensor,
    delta_scratch: &Tensor,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    scale: f32,
    dropout: DropoutSpec,
) -> Result<(), GpuError> {
    let path = path(rec.gpu, shape, q.dtype)?;
    attention_backward_on(
        path,
        rec,
        shape,
        q,
        k,
        v,
        o,
        d_out,
        mask,
        lse,
        delta_scratch,
        dq,
        dk,
        dv,
        scale,
        dropout,
    )
}

/// `attention_backward` on a given path. Fused: the delta prepass, dq over query blocks
/// and dk/dv over key blocks (nine storage buffers). Unfused: the delta prepass, then per
/// chunk of sequences Q·Kᵀ and dO·Vᵀ, the softmax backward, dV, dQ and dK.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_on(
    path: AttentionPath,
    rec: &mut Recorder,
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_out: &Tensor,
    mask: &Tensor,
    lse: &Tensor,
    delta_scratch: &Tensor,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    scale: f32,
    dropout: DropoutSpec,
) -> Result<(), GpuError> {
    let op = "attention_backward";
    let qkv = expect_qkv(op, rec.gpu, shape, [q, k, v])?;
    for t in [o, d_out, dq, dk, dv] {
        expect_len(op, t, shape.qkv_len())?;
    }
    expect_len(op, mask, shape.mask_len())?;
    expect_len(op, lse, shape.rows_len())?;
    expect_len(op, delta_scratch, shape.rows_len())?;
    let params = params(op, shape, scale, dropout)?;
    let storage = rec.gpu.limits.max_storage_buffers_per_shader_stage as usize;
    if path == AttentionPath::Fused && storage < BACKWARD_DKDV.bindings.len() {
        return Err(GpuError::Device {
            op: op.into(),
            message: format!(
                "needs {} storage buffers per shader stage, the adapter allows {storage}",
                BACKWARD_DKDV.bindings.len()
            ),
        });
    }
    if shape.rows_len() == 0 {
        return Ok(());
    }
    let rows = to_u32(op, "rows", shape.rows_len())?;
    let delta_groups = spread(rec.gpu, rows.div_ceil(256));
    let delta_defines = defines(rec.gpu, shape, ElementType::F32)?;
    rec.dispatch(&DELTA, &delta_defines, &params, &[o, d_out, delta_scratch], delta_groups)?;
    if path == AttentionPath::Unfused {
        let tensors = Backward { q, k, v, d_out, mask, lse, delta: delta_scratch, dq, dk, dv };
        return unfused_backward(rec, shape, &tensors, &params);
    }
    let defines = defines(rec.gpu, shape, qkv)?;
    let groups = row_blocks(rec, op, shape)?;
    let inputs = [q, k, v, mask, d_out, lse, delta_scratch];
    let dq_tensors: Vec<&Tensor> = inputs.iter().copied().chain([dq]).collect();
    rec.dispatch(&BACKWARD_DQ, &defines, &params, &dq_tensors, groups)?;
    let dkdv_tensors: Vec<&Tensor> = inputs.iter().copied().chain([dk, dv]).collect();
    rec.dispatch(&BACKWARD_DKDV, &defines, &params, &dkdv_tensors, groups)
}

// ----------------------------------------------------------------------------------------
// Which path runs

/// How attention is computed: see the module header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    Fused,
    Unfused,
}

impl AttentionPath {
    pub fn name(self) -> &'static str {
        match self {
            AttentionPath::Fused => "fused",
            AttentionPath::Unfused => "unfused",
        }
    }

    fn parse(name: &str) -> Option<AttentionPath> {
        [AttentionPath::Fused, AttentionPath::Unfused].into_iter().find(|p| p.name() == name)
    }
}

/// The path `shape` runs on, with q, k and v stored as `qkv`: `PALS_ATTENTION=fused|unfused`
/// when set; unfused on CPU adapters, by rule (there the fused kernel's row loops are ~10×
/// slower, and measuring would cost a first run seconds of pipeline builds); on GPUs the
/// faster of the two, measured once per shape class ([`measure_path`]) and cached like the
/// matmul tiles (fused where tuning is off).
pub fn path(gpu: &Gpu, shape: AttentionShape, qkv: ElementType) -> Result<AttentionPath, GpuError> {
    if let Some(forced) = forced_path()? {
        return Ok(forced);
    }
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return Ok(AttentionPath::Unfused);
    }
    if !tuning_enabled() {
        return Ok(AttentionPath::Fused);
    }
    measure_path(gpu, shape, qkv)
}

/// `PALS_ATTENTION`'s path, if set.
fn forced_path() -> Result<Option<AttentionPath>, GpuError> {
    match std::env::var("PALS_ATTENTION") {
        Err(_) => Ok(None),
        Ok(name) => AttentionPath::parse(&name).map(Some).ok_or_else(|| GpuError::Device {
            op: "attention".into(),
            message: format!("PALS_ATTENTION='{name}' is not a path: use fused or unfused"),
        }),
    }
}

/// The unfused path is taken only when it measures this much faster: the paths differ in
/// f32 rounding, and a near tie must not flip between two fresh runs.
const UNFUSED_MARGIN: f64 = 1.1;

/// The faster path for `shape`'s class (its sequence length's power-of-two bucket, head
/// dim and q/k/v type), from one forward + backward of each on a proxy of up to 8
/// sequences; remembered in the adapter's tuning cache. The unfused path's products are the
/// matmul's, on tensor cores where the adapter has them and q, k, v are f16.
pub fn measure_path(gpu: &Gpu, shape: AttentionShape, qkv: ElementType) -> Result<AttentionPath, GpuError> {
    let key = format!(
        "attention:s{}:d{}:{}",
        shape.seq.max(1).next_power_of_two(),
        shape.head_dim,
        if qkv == ElementType::F16 { "f16" } else { "f32" }
    );
    if let Some(found) = gpu.tune.get(&key).as_deref().and_then(AttentionPath::parse) {
        return Ok(found);
    }
    let proxy = AttentionOperands::new(gpu, AttentionShape { batch: shape.batch.clamp(1, 8), ..shape }, qkv)?;
    // One forward and backward, after one that compiles the path's pipelines.
    let seconds = |path| -> Result<f64, GpuError> {
        proxy.forward_seconds(gpu, path)?;
        proxy.backward_seconds(gpu, path)?;
        Ok(proxy.forward_seconds(gpu, path)? + proxy.backward_seconds(gpu, path)?)
    };
    let names = [AttentionPath::Fused, AttentionPath::Unfused].map(|p| p.name().to_string());
    let chosen = gpu.tune.choose(&key, &names, |name| {
        let path = AttentionPath::parse(name).unwrap_or(AttentionPath::Fused);
        let margin = if path == AttentionPath::Unfused { UNFUSED_MARGIN } else { 1.0 };
        seconds(path).map_or(f64::INFINITY, |s| s * margin)
    });
    Ok(AttentionPath::parse(&chosen).unwrap_or(AttentionPath::Fused))
}

/// Every buffer one forward and backward need, zero-filled (q, k, v stored as `qkv`): what
/// [`measure_path`] times, and, filled, `pals bench`'s attention rows.
pub struct AttentionOperands {
    pub shape: AttentionShape,
    pub(crate) q: Tensor,
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) mask: Tensor,
    pub(crate) out: Tensor,
    pub(crate) lse: Tensor,
    pub(crate) d_out: Tensor,
    pub(crate) delta: Tensor,
    pub(crate) dq: Tensor,
    pub(crate) dk: Tensor,
    pub(crate) dv: Tensor,
}

/// The dropout a measured forward and backward draw (BERT's rate).
const MEASURED_DROPOUT: DropoutSpec = DropoutSpec { p: 0.1, seed: 1, stream: 2, shard: 0 };

impl AttentionOperands {
    pub fn new(gpu: &Gpu, shape: AttentionShape, qkv: ElementType) -> Result<AttentionOperands, GpuError> {
        let (n, rows) = (shape.qkv_len(), shape.rows_len());
        let zeros = |name: &str, len: usize| gpu.zeros(name, &[len]);
        let qkv_zeros = |name: &str| gpu.zeros_of(name, &[n], qkv);
        Ok(AttentionOperands {
            shape,
            q: qkv_zeros("q")?,
            k: qkv_zeros("k")?,
            v: qkv_zeros("v")?,
            mask: zeros("mask", shape.mask_len())?,
            out: zeros("out", n)?,
            lse: zeros("lse", rows)?,
            d_out: zeros("d_out", n)?,
            delta: zeros("delta", rows)?,
            dq: zeros("dq", n)?,
            dk: zeros("dk", n)?,
            dv: zeros("dv", n)?,
        })
    }

    /// Q·Kᵀ and P·V: 4·B·H·S²·D.
    pub fn forward_flops(&self) -> f64 {
        let s = &self.shape;
        4.0 * (s.batch * s.heads) as f64 * (s.seq * s.seq * s.head_dim) as f64
    }

    /// Recomputing Q·Kᵀ, then dV, dP, dQ, dK (dQ and dK/dV kernels each recompute P): 10·B·H·S²·D.
    pub fn backward_flops(&self) -> f64 {
        2.5 * self.forward_flops()
    }

    /// A recorder as a step would record these operands: f16 q, k, v are mixed precision's,
    /// whose steps let every product round to f16.
    fn recorder<'g>(&self, gpu: &'g Gpu) -> Recorder<'g> {
        let mut rec = gpu.recorder();
        rec.round_products_to_f16(self.q.dtype == ElementType::F16);
        rec
    }

    /// Seconds of one forward on `path`, submitted and waited for.
    pub fn forward_seconds(&self, gpu: &Gpu, path: AttentionPath) -> Result<f64, GpuError> {
        let started = std::time::Instant::now();
        let mut rec = self.recorder(gpu);
        let o = self;
        let (q, k, v, scale) = (&o.q, &o.k, &o.v, o.shape.scale());
        attention_forward_on(
            path,
            &mut rec,
            o.shape,
            q,
            k,
            v,
            &o.mask,
            &o.out,
            &o.lse,
            scale,
            MEASURED_DROPOUT,
        )?;
        rec.submit()?;
        gpu.wait()?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Seconds of one backward on `path`, submitted and waited for.
    pub fn backward_seconds(&self, gpu: &Gpu, path: AttentionPath) -> Result<f64, GpuError> {
        let started = std::time::Instant::now();
        let mut rec = self.recorder(gpu);
        let o = self;
        let (grads, scale) = ((&o.delta, &o.dq, &o.dk, &o.dv), o.shape.scale());
        #[rustfmt::skip]
        attention_backward_on(
            path, &mut rec, o.shape, &o.q, &o.k, &o.v, &o.out, &o.d_out, &o.mask, &o.lse, grads.0, grads.1,
            grads.2, grads.3, scale, MEASURED_DROPOUT,
        )?;
        rec.submit()?;
        gpu.wait()?;
        Ok(started.elapsed().as_secs_f64())
    }
}

// ----------------------------------------------------------------------------------------
// The unfused path

/// The most bytes one workspace score matrix takes on a CPU adapter; longer batches run in
/// chunks. Small enough that a chunk's scores stay in a CPU's L2 cache from Q·Kᵀ through
/// the softmax to P·V: on lavapipe 1 MiB chunks (one sequence of MiniLM or BERT-base at
/// S = 128) ran the forward and backward about twice as fast as 32 MiB ones (one chunk for
/// the batch).
pub const CPU_WORKSPACE_BYTES: usize = 1 << 20;
/// The same on GPUs, where each chunk's five to eight dispatches are what costs: BERT-base's
/// batch of 32 × 128 (24 MiB of scores) is one chunk.
pub const GPU_WORKSPACE_BYTES: usize = 64 << 20;

/// Bytes one workspace score matrix may take on this adapter (within its largest binding).
pub fn workspace_limit(gpu: &Gpu) -> usize {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return CPU_WORKSPACE_BYTES;
    }
    GPU_WORKSPACE_BYTES.min(gpu.limits.max_storage_buffer_binding_size as usize)
}

/// Sequences per chunk: as many as fit `limit` bytes, at least one.
fn chunk_sequences(shape: AttentionShape, limit: usize) -> usize {
    let per_sequence = 4 * shape.heads * shape.seq * shape.seq;
    (limit / per_sequence.max(1)).clamp(1, shape.batch.max(1))
}

/// Elements of one workspace score matrix: always the whole `limit` (or one sequence's
/// scores where larger), so that every shape of a run shares one buffer and the
/// recorder's cached bind groups stay valid after the first step.
fn workspace_len(shape: AttentionShape, limit: usize) -> usize {
    (limit / 4).max(shape.heads * shape.seq * shape.seq)
}

/// Bytes of workspace the unfused path holds for `shape` under `limit`
/// ([`workspace_limit`]): one score matrix for the forward, two for the backward (the
/// larger of what this shape and earlier ones needed).
pub fn workspace_bytes(shape: AttentionShape, backward: bool, limit: usize) -> u64 {
    (4 * workspace_len(shape, limit) * if backward { 2 } else { 1 }) as u64
}

/// Where a product operand lives: a [B, S, H, D] tensor (head h of sequence b at
/// b·S·H·D + h·D, rows H·D apart) or the chunk's packed [C, H, S, S] scores.
#[derive(Clone, Copy)]
enum Layout {
    Heads,
    Scores,
}

/// (row stride, offset, sequence stride, head stride) of an operand for the chunk that
/// starts at sequence `first`.
fn addressing(shape: AttentionShape, first: usize, layout: Layout) -> (usize, usize, usize, usize) {
    let (s, h, d) = (shape.seq, shape.heads, shape.head_dim);
    match layout {
        Layout::Heads => (h * d, first * s * h * d, s * h * d, d),
        Layout::Scores => (s, 0, h * s * s, s * s),
    }
}

/// One product per (b, h) of `sequences` sequences from `first`: C = op(A)·op(B), M×K·K×N.
fn head_product(
    shape: AttentionShape,
    (first, sequences): (usize, usize),
    [m, n, k]: [usize; 3],
    (trans_a, trans_b): (bool, bool),
    layouts: [Layout; 3],
) -> Matmul {
    let [a, b, c] = layouts.map(|l| addressing(shape, first, l));
    Matmul {
        lda: Some(a.0),
        ldb: Some(b.0),
        ldc: Some(c.0),
        offset_a: a.1,
        offset_b: b.1,
        offset_c: c.1,
        stride_a: Some(a.2),
        stride_b: Some(b.2),
        stride_c: Some(c.2),
        inner: Some(InnerBatch { count: shape.heads, stride_a: a.3, stride_b: b.3, stride_c: c.3 }),
        trans_a,
        trans_b,
        ..Matmul::new(m, n, k).batched(sequences * shape.heads)
    }
}

/// How many chunks the unfused path runs `shape` in under `limit` (its dispatches are per
/// chunk).
pub fn chunk_count(shape: AttentionShape, limit: usize) -> usize {
    chunks(shape, limit).count()
}

/// (first sequence, sequences) of each chunk.
fn chunks(shape: AttentionShape, limit: usize) -> impl Iterator<Item = (usize, usize)> {
    let size = chunk_sequences(shape, limit);
    (0..shape.batch).step_by(size).map(move |first| (first, size.min(shape.batch - first)))
}

/// The softmax kernels' parameters for one chunk.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SoftmaxParams {
    seq: u32,
    heads: u32,
    rows: u32,
    row0: u32,
    scale: f32,
    seed: u32,
    stream: u32,
    threshold: u32,
    drop_scale: f32,
    first_index: u32,
}

fn softmax_params(
    p: &Params,
    shape: AttentionShape,
    (first, sequences): (usize, usize),
) -> Result<SoftmaxParams, GpuError> {
    let rows_per_sequence = shape.heads * shape.seq;
    Ok(SoftmaxParams {
        seq: p.seq,
        heads: p.heads,
        rows: to_u32("attention_softmax", "rows", sequences * rows_per_sequence)?,
        row0: to_u32("attention_softmax", "first row", first * rows_per_sequence)?,
        scale: p.scale,
        seed: p.seed,
        stream: p.stream,
        threshold: p.threshold,
        drop_scale: p.drop_scale,
        first_index: p.first_index,
    })
}

/// One of the unfused path's products on the batched matmul, timed as attention.
fn product(rec: &mut Recorder, [a, b, c]: [&Tensor; 3], op: &Matmul) -> Result<(), GpuError> {
    rec.labelled("attention_products", |rec| matmul::matmul(rec, a, b, c, op, Epilogue::None))
}

/// The chunks' score matrices in the workspace `name`.
fn scores_workspace(gpu: &Gpu, name: &'static str, shape: AttentionShape) -> Result<Tensor, GpuError> {
    gpu.workspace(name, workspace_len(shape, workspace_limit(gpu)))
}

/// [q, k, v, mask, out, lse]: per chunk, scores = Q·Kᵀ, the softmax in place, out = P·V.
/// Only the products read q, k and v: an f16 one is the matmul's f16 A or B storage.
fn unfused_forward(
    rec: &mut Recorder,
    shape: AttentionShape,
    [q, k, v, mask, out, lse]: [&Tensor; 6],
    params: &Params,
) -> Result<(), GpuError> {
    use Layout::{Heads, Scores};
    let (s, d) = (shape.seq, shape.head_dim);
    let scores = scores_workspace(rec.gpu, "attention.scores", shape)?;
    for chunk in chunks(shape, workspace_limit(rec.gpu)) {
        let qk = head_product(shape, chunk, [s, s, d], (false, true), [Heads, Heads, Scores]);
        product(rec, [q, k, &scores], &qk)?;
        let p = softmax_params(params, shape, chunk)?;
        let groups = spread(rec.gpu, p.rows.div_ceil(SOFTMAX_WG));
        rec.dispatch(&SOFTMAX, "", &p, &[mask, &scores, lse], groups)?;
        let pv = head_product(shape, chunk, [s, d, s], (false, false), [Scores, Heads, Heads]);
        product(rec, [&scores, v, out], &pv)?;
    }
    Ok(())
}

/// The backward's tensors (delta already holds rowsum(dO ⊙ o)).
struct Backward<'t> {
    q: &'t Tensor,
    k: &'t Tensor,
    v: &'t Tensor,
    d_out: &'t Tensor,
    mask: &'t Tensor,
    lse: &'t Tensor,
    delta: &'t Tensor,
    dq: &'t Tensor,
    dk: &'t Tensor,
    dv: &'t Tensor,
}

/// Per chunk: P recomputed from Q·Kᵀ and lse (nothing S×S is kept from the forward, so
/// every layer shares the workspace), dP = dO·Vᵀ, then dV = (P·keep)ᵀ·dO, dQ = dS·K,
/// dK = dSᵀ·Q with dS = scale·P·(dP·keep − delta). As in the forward, q, k and v (f32 or
/// f16) reach only the products; the scores, dO and the gradients are f32.
fn unfused_backward(
    rec: &mut Recorder,
    shape: AttentionShape,
    t: &Backward,
    params: &Params,
) -> Result<(), GpuError> {
    use Layout::{Heads, Scores};
    let (s, d) = (shape.seq, shape.head_dim);
    let probs = scores_workspace(rec.gpu, "attention.scores", shape)?;
    let d_scores = scores_workspace(rec.gpu, "attention.d_scores", shape)?;
    for chunk in chunks(shape, workspace_limit(rec.gpu)) {
        let by_keys = head_product(shape, chunk, [s, s, d], (false, true), [Heads, Heads, Scores]);
        product(rec, [t.q, t.k, &probs], &by_keys)?;
        product(rec, [t.d_out, t.v, &d_scores], &by_keys)?;
        let p = softmax_params(params, shape, chunk)?;
        let groups = spread(rec.gpu, p.rows.div_ceil(SOFTMAX_WG));
        let tensors = [t.mask, t.lse, t.delta, &probs, &d_scores];
        rec.dispatch(&SOFTMAX_BACKWARD, "", &p, &tensors, groups)?;
        let transposed = head_product(shape, chunk, [s, d, s], (true, false), [Scores, Heads, Heads]);
        product(rec, [&probs, t.d_out, t.dv], &transposed)?;
        product(rec, [&d_scores, t.q, t.dk], &transposed)?;
        let plain = head_product(shape, chunk, [s, d, s], (false, false), [Scores, Heads, Heads]);
        product(rec, [&d_scores, t.k, t.dq], &plain)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_is_bounded_and_chunks_cover_the_batch() {
        for (batch, seq, heads) in
            [(32, 128, 12), (8, 512, 12), (3, 512, 12), (1, 1, 1), (5, 7, 3), (2, 2048, 16)]
        {
            let shape = AttentionShape { batch, seq, heads, head_dim: 64 };
            let per_sequence = 4 * heads * seq * seq;
            for limit in [CPU_WORKSPACE_BYTES, GPU_WORKSPACE_BYTES] {
                let what = format!("{shape:?} limit {limit}");
                assert_eq!(workspace_bytes(shape, false, limit) as usize, limit.max(per_sequence), "{what}");
                assert_eq!(workspace_bytes(shape, true, limit), 2 * workspace_bytes(shape, false, limit));
                let mut next = 0;
                for (first, sequences) in chunks(shape, limit) {
                    let most = chunk_sequences(shape, limit);
                    assert!(first == next && sequences >= 1 && sequences <= most, "{what}");
                    next += sequences;
                }
                assert_eq!(next, batch, "{what}");
            }
        }
        // BERT-base at batch 32 x 128: on a CPU chunks of one sequence (768 KiB) in 1 MiB
        // matrices; on a GPU the whole batch (24 MiB) in one chunk.
        let base = AttentionShape { batch: 32, seq: 128, heads: 12, head_dim: 64 };
        assert_eq!(workspace_bytes(base, true, CPU_WORKSPACE_BYTES), 2 << 20);
        assert_eq!(chunks(base, CPU_WORKSPACE_BYTES).count(), 32);
        assert_eq!(chunks(base, GPU_WORKSPACE_BYTES).count(), 1);
    }

    #[test]
    fn tiles_fit_16_kib() {
        for d in 1..=MAX_HEAD_DIM {
            let rows = tile_rows(d);
            assert!(rows >= 16 && 2 * rows * d * 4 <= 16384, "d={d} rows={rows}");
        }
        assert_eq!(tile_rows(64), 32);
        assert_eq!(tile_rows(34), 32);
        assert_eq!(tile_rows(32), 64);
    }
}
