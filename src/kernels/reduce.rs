//! Deterministic column sums (bias and LayerNorm parameter gradients): shaders/reduce.wgsl.

use super::{storage_aliases, to_u32};
use crate::gpu::{Binding, ElementType, GpuError, KernelSpec, Recorder, Tensor};

/// Rows one workgroup sums; must match CHUNK_ROWS in reduce.wgsl.
const CHUNK_ROWS: usize = 256;

const COLSUM: KernelSpec = KernelSpec {
    name: "colsum",
    source: include_str!("../../shaders/reduce.wgsl"),
    entry: "colsum",
    bindings: &[Binding::Read, Binding::Write],
    trusted: false,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    offset: u32,
    accumulate: u32,
}

/// The number of rows of `tensor` seen as [rows, n]: an error unless its last dimension is n.
pub(crate) fn rows_of(op: &str, tensor: &Tensor, n: usize) -> Result<usize, GpuError> {
    match tensor.shape.last() {
        Some(&last) if last == n => Ok(tensor.len() / n.max(1)),
        _ => Err(GpuError::Shape {
            op: op.to_string(),
            detail: format!("'{}' has shape {:?}, expected last dimension {n}", tensor.name, tensor.shape),
        }),
    }
}

/// out [N] = sum over rows of x [.., N], or out += that sum when `accumulate`.
/// Rows are summed in a fixed order that depends only on the shape. Past 256 rows this
/// allocates a [ceil(M / 256), N] scratch for the partial sums.
pub fn colsum(rec: &mut Recorder, x: &Tensor, out: &Tensor, accumulate: bool) -> Result<(), GpuError> {
    let n = out.len();
    let m = rows_of("colsum", x, n)?;
    colsum_rows(rec, x, 0, m, n, out, accumulate)
}

/// Elements of the scratch [`colsum_with_scratch`] needs for x [m, n]: the first pass's
/// partial sums, 0 when one pass suffices.
pub fn colsum_scratch_len(m: usize, n: usize) -> usize {
    let chunks = m.div_ceil(CHUNK_ROWS);
    if chunks > 1 { chunks * n } else { 0 }
}

/// `colsum` with the first pass's partial sums in `scratch` (at least
/// [`colsum_scratch_len`] elements) instead of a new buffer, so that a training step does
/// not allocate. Past 65536 rows the second pass still allocates its own partials.
pub fn colsum_with_scratch(
    rec: &mut Recorder,
    x: &Tensor,
    out: &Tensor,
    accumulate: bool,
    scratch: &Tensor,
) -> Result<(), GpuError> {
    let n = out.len();
    let m = rows_of("colsum", x, n)?;
    colsum_rows_in(rec, x, 0, m, n, out, accumulate, Some(scratch))
}

/// Column sum of the [m, n] block of `x` that starts at element `offset`: the one
/// reduction path, shared with LayerNorm's parameter gradients.
pub(crate) fn colsum_rows(
    rec: &mut Recorder,
    x: &Tensor,
    offset: usize,
    m: usize,
    n: usize,
    out: &Tensor,
    accumulate: bool,
) -> Result<(), GpuError> {
    colsum_rows_in(rec, x, offset, m, n, out, accumulate, None)
}

/// `colsum_rows` with the first pass's partials in `scratch` when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn colsum_rows_in(
    rec: &mut Recorder,
    x: &Tensor,
    offset: usize,
    m: usize,
    n: usize,
    out: &Tensor,
    accumulate: bool,
    scratch: Option<&Tensor>,
) -> Result<(), GpuError> {
    let chunks = m.div_ceil(CHUNK_ROWS).max(1);
    if chunks == 1 {
        return colsum_pass(rec, x, offset, m, n, out, accumulate);
    }
    let allocated;
    let partial = match scratch {
        Some(s) if s.len() >= chunks * n => s,
        Some(s) => {
            return Err(GpuError::Shape {
                op: COLSUM.name.into(),
                detail: format!("scratch '{}' has {} elements, needs {}", s.name, s.len(), chunks * n),
            });
        }
        None => {
            allocated = rec.gpu.zeros("colsum partials", &[chunks, n])?;
            &allocated
        }
    };
    colsum_pass(rec, x, offset, m, n, partial, false)?;
    colsum_rows(rec, partial, 0, chunks, n, out, accumulate)
}

/// One pass: out[c, :] = sum of rows chunk c of the block.
fn colsum_pass(
    rec: &mut Recorder,
    x: &Tensor,
    offset: usize,
    m: usize,
    n: usize,
    out: &Tensor,
    accumulate: bool,
) -> Result<(), GpuError> {
    let op = COLSUM.name;
    let chunks = m.div_ceil(CHUNK_ROWS).max(1);
    let params = Params {
        m: to_u32(op, "rows", m)?,
        n: to_u32(op, "columns", n)?,
        offset: to_u32(op, "offset", offset)?,
        accumulate: accumulate as u32,
    };
    let groups = [to_u32(op, "column strips", n.div_ceil(64))?, to_u32(op, "row chunks", chunks)?, 1];
    out.expect_type(op, ElementType::F32)?;
    let defines = storage_aliases(op, rec.gpu, &[("X_TYPE", x.dtype)])?;
    rec.dispatch(&COLSUM, &defines, &params, &[x, out], groups)
}
