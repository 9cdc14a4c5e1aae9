//! Fused multi-head self-attention, forward and backward: shaders/attention.wgsl.

use super::elementwise::DropoutSpec;
use super::{expect_len, to_u32};
use crate::gpu::{Binding, GpuError, KernelSpec, Recorder, Tensor, spread};
use Binding::{Read, Write};

const SOURCE: &str =
    concat!(include_str!("../../shaders/rng.wgsl"), include_str!("../../shaders/attention.wgsl"));

const FORWARD: KernelSpec = KernelSpec {
    name: "attention_forward",
    source: SOURCE,
    entry: "attention_forward",
    bindings: &[Read, Read, Read, Read, Write, Write],
};
const DELTA: KernelSpec = KernelSpec {
    name: "attention_delta",
    source: SOURCE,
    entry: "attention_delta",
    bindings: &[Read, Read, Write],
};
const BACKWARD_DQ: KernelSpec = KernelSpec {
    name: "attention_backward_dq",
    source: SOURCE,
    entry: "attention_backward_dq",
    bindings: &[Read, Read, Read, Read, Read, Read, Read, Write],
};
const BACKWARD_DKDV: KernelSpec = KernelSpec {
    name: "attention_backward_dkdv",
    source: SOURCE,
    entry: "attention_backward_dkdv",
    bindings: &[Read, Read, Read, Read, Read, Read, Read, Write, Write],
};

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

fn defines(shape: AttentionShape) -> String {
    format!(
        "const HEAD_DIM: u32 = {}u;\nconst BLOCK_K: u32 = {}u;\n",
        shape.head_dim,
        tile_rows(shape.head_dim)
    )
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
/// writes each row's log-sum-exp of the scaled, masked scores for the backward.
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
    let op = FORWARD.name;
    for t in [q, k, v, out] {
        expect_len(op, t, shape.qkv_len())?;
    }
    expect_len(op, mask, shape.mask_len())?;
    expect_len(op, lse, shape.rows_len())?;
    let params = params(op, shape, scale, dropout)?;
    if shape.rows_len() == 0 {
        return Ok(());
    }
    let groups = row_blocks(rec, op, shape)?;
    rec.dispatch(&FORWARD, &defines(shape), &params, &[q, k, v, mask, out, lse], groups)
}

/// dq, dk, dv of the forward above, given its o and lse and the same scale and dropout.
/// `delta_scratch` [B, H, S] receives rowsum(dO ⊙ o). Three dispatches: the delta
/// prepass, dq over query blocks and dk/dv over key blocks (nine storage buffers).
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
    let op = "attention_backward";
    for t in [q, k, v, o, d_out, dq, dk, dv] {
        expect_len(op, t, shape.qkv_len())?;
    }
    expect_len(op, mask, shape.mask_len())?;
    expect_len(op, lse, shape.rows_len())?;
    expect_len(op, delta_scratch, shape.rows_len())?;
    let params = params(op, shape, scale, dropout)?;
    let storage = rec.gpu.limits.max_storage_buffers_per_shader_stage as usize;
    if storage < BACKWARD_DKDV.bindings.len() {
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
    let defines = defines(shape);
    let rows = to_u32(op, "rows", shape.rows_len())?;
    let delta_groups = spread(rec.gpu, rows.div_ceil(256));
    rec.dispatch(&DELTA, &defines, &params, &[o, d_out, delta_scratch], delta_groups)?;
    let groups = row_blocks(rec, op, shape)?;
    let inputs = [q, k, v, mask, d_out, lse, delta_scratch];
    let dq_tensors: Vec<&Tensor> = inputs.iter().copied().chain([dq]).collect();
    rec.dispatch(&BACKWARD_DQ, &defines, &params, &dq_tensors, groups)?;
    let dkdv_tensors: Vec<&Tensor> = inputs.iter().copied().chain([dk, dv]).collect();
    rec.dispatch(&BACKWARD_DKDV, &defines, &params, &dkdv_tensors, groups)
}

#[cfg(test)]
mod tests {
    use super::*;

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
