//! BERT embeddings (word + position + token type), forward and deterministic backward:
//! shaders/embedding.wgsl.
//!
//! The backward never uses atomics: the host knows the token ids, so it groups the rows of
//! d_out per id ([`SegmentPlan`], CSR) and the GPU sums each group in row order.

use super::{expect_len, expect_shape, to_u32};
use crate::gpu::{Binding, Gpu, GpuError, KernelSpec, Recorder, Tensor, spread};

const SOURCE: &str = include_str!("../../shaders/embedding.wgsl");
const FORWARD: KernelSpec = KernelSpec {
    name: "embedding_forward",
    source: SOURCE,
    entry: "embedding_forward",
    bindings: &[
        Binding::Read,  // ids
        Binding::Read,  // type_ids
        Binding::Read,  // word
        Binding::Read,  // pos
        Binding::Read,  // types
        Binding::Write, // out
    ],
    trusted: false,
};
const SEGMENT_SUM: KernelSpec = KernelSpec {
    name: "segment_sum",
    source: SOURCE,
    entry: "segment_sum",
    bindings: &[
        Binding::Read,  // d_out
        Binding::Read,  // seg_ids
        Binding::Read,  // offsets
        Binding::Read,  // rows
        Binding::Write, // grad
    ],
    trusted: false,
};
const ZERO_FILL: KernelSpec = KernelSpec {
    name: "zero_fill",
    source: SOURCE,
    entry: "zero_fill",
    bindings: &[Binding::Write],
    trusted: false,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    seq: u32,
    hidden: u32,
    strips: u32,
}

/// The three tables, word [V, H], position [P, H] and token type [T, H], or their gradients.
#[derive(Clone, Copy)]
pub struct Embeddings<'a> {
    pub word: &'a Tensor,
    pub pos: &'a Tensor,
    pub types: &'a Tensor,
}

impl Embeddings<'_> {
    /// H, checking that all three tables are [_, H].
    fn hidden(&self, op: &str) -> Result<usize, GpuError> {
        let hidden = self.word.shape.last().copied().unwrap_or(0);
        for table in [self.word, self.pos, self.types] {
            if table.shape.len() != 2 || table.shape[1] != hidden {
                return Err(GpuError::Shape {
                    op: op.to_string(),
                    detail: format!(
                        "'{}' has shape {:?}, expected [rows, {hidden}]",
                        table.name, table.shape
                    ),
                });
            }
        }
        Ok(hidden)
    }
}

/// For each distinct id (increasing), the rows that hold it (increasing): CSR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPlan {
    pub ids: Vec<u32>,
    /// Segment k is rows[offsets[k]..offsets[k + 1]]; len = ids.len() + 1.
    pub offsets: Vec<u32>,
    pub rows: Vec<u32>,
}

impl SegmentPlan {
    /// Groups the rows of `ids` by id; an error for an id at or past `vocab`.
    pub fn new(ids: &[u32], vocab: usize) -> Result<SegmentPlan, GpuError> {
        if let Some(row) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(GpuError::Shape {
                op: "segment plan".into(),
                detail: format!("id {} at row {row} is not below {vocab}", ids[row]),
            });
        }
        let count = to_u32("segment plan", "rows", ids.len())?;
        let mut rows: Vec<u32> = (0..count).collect();
        rows.sort_by_key(|&r| ids[r as usize]); // stable: rows stay increasing per id
        let mut plan = SegmentPlan { ids: Vec::new(), offsets: Vec::new(), rows };
        for (j, &row) in plan.rows.iter().enumerate() {
            let id = ids[row as usize];
            if plan.ids.last() != Some(&id) {
                plan.ids.push(id);
                plan.offsets.push(j as u32);
            }
        }
        plan.offsets.push(count);
        Ok(plan)
    }
}

/// A [`SegmentPlan`] on the GPU, for a gradient table of `vocab` rows.
pub struct GpuSegmentPlan {
    pub ids: Tensor,
    pub offsets: Tensor,
    pub rows: Tensor,
    pub vocab: usize,
}

impl GpuSegmentPlan {
    /// Builds the plan for `ids` and uploads it.
    pub fn new(gpu: &Gpu, name: &str, ids: &[u32], vocab: usize) -> Result<Self, GpuError> {
        let plan = SegmentPlan::new(ids, vocab)?;
        Ok(GpuSegmentPlan {
            ids: gpu.upload(&format!("{name} ids"), &[plan.ids.len()], &plan.ids)?,
            offsets: gpu.upload(&format!("{name} offsets"), &[plan.offsets.len()], &plan.offsets)?,
            rows: gpu.upload(&format!("{name} rows"), &[plan.rows.len()], &plan.rows)?,
            vocab,
        })
    }
}

/// The word, position and token-type plans of one batch.
pub struct EmbeddingPlan {
    pub word: GpuSegmentPlan,
    pub pos: GpuSegmentPlan,
    pub types: GpuSegmentPlan,
}

impl EmbeddingPlan {
    /// Plans for a batch of `ids` and `type_ids` (both [B, S] row-major, S = `seq`), checked
    /// against the sizes of `tables` (the weights or their gradients).
    pub fn new(
        gpu: &Gpu,
        ids: &[u32],
        type_ids: &[u32],
        seq: usize,
        tables: &Embeddings,
    ) -> Result<EmbeddingPlan, GpuError> {
        tables.hidden("embedding plan")?;
        if type_ids.len() != ids.len()
            || (seq == 0 && !ids.is_empty())
            || !ids.len().is_multiple_of(seq.max(1))
        {
            return Err(GpuError::Shape {
                op: "embedding plan".into(),
                detail: format!("{} ids and {} type ids are not [batch, {seq}]", ids.len(), type_ids.len()),
            });
        }
        let positions: Vec<u32> = (0..ids.len()).map(|r| (r % seq) as u32).collect();
        Ok(EmbeddingPlan {
            word: GpuSegmentPlan::new(gpu, "word plan", ids, tables.word.shape[0])?,
            pos: GpuSegmentPlan::new(gpu, "position plan", &positions, tables.pos.shape[0])?,
            types: GpuSegmentPlan::new(gpu, "type plan", type_ids, tables.types.shape[0])?,
        })
    }
}

/// out [B * S, H] = word[ids] + pos[s] + types[type_ids], ids and type_ids [B, S] (u32).
pub fn embedding_forward(
    rec: &mut Recorder,
    ids: &Tensor,
    type_ids: &Tensor,
    tables: &Embeddings,
    out: &Tensor,
) -> Result<(), GpuError> {
    let op = FORWARD.name;
    let hidden = tables.hidden(op)?;
    let [batch, seq] = ids.shape[..] else {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: format!("'{}' has shape {:?}, expected [batch, seq]", ids.name, ids.shape),
        });
    };
    expect_shape(op, type_ids, &ids.shape)?;
    expect_shape(op, out, &[batch * seq, hidden])?;
    if seq > tables.pos.shape[0] {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: format!("sequence length {seq} exceeds '{}'", tables.pos.name),
        });
    }
    let params = Params {
        n: to_u32(op, "elements", out.len())?,
        seq: to_u32(op, "seq", seq)?,
        hidden: to_u32(op, "hidden", hidden)?,
        strips: 0,
    };
    let tensors = [ids, type_ids, tables.word, tables.pos, tables.types, out];
    let groups = spread(rec.gpu, params.n.div_ceil(256));
    rec.dispatch(&FORWARD, "", &params, &tensors, groups)
}

/// grad[id] = sum of the rows of d_out [R, H] that `plan` groups under id, for each id in
/// the plan; other rows of grad [V, H] are left as they are.
pub fn segment_sum(
    rec: &mut Recorder,
    d_out: &Tensor,
    plan: &GpuSegmentPlan,
    grad: &Tensor,
) -> Result<(), GpuError> {
    let op = SEGMENT_SUM.name;
    let hidden = grad.shape.last().copied().unwrap_or(0);
    expect_shape(op, grad, &[plan.vocab, hidden])?;
    expect_shape(op, d_out, &[plan.rows.len(), hidden])?;
    expect_len(op, &plan.offsets, plan.ids.len() + 1)?;
    let strips = hidden.div_ceil(256);
    let params = Params {
        n: to_u32(op, "segments", plan.ids.len())?,
        seq: 0,
        hidden: to_u32(op, "hidden", hidden)?,
        strips: to_u32(op, "strips", strips)?,
    };
    let tensors = [d_out, &plan.ids, &plan.offsets, &plan.rows, grad];
    let groups = to_u32(op, "workgroups", plan.ids.len() * strips)?;
    if groups == 0 {
        return Ok(());
    }
    rec.dispatch(&SEGMENT_SUM, "", &params, &tensors, spread(rec.gpu, groups))
}

/// tensor = 0.
pub fn zero_fill(rec: &mut Recorder, tensor: &Tensor) -> Result<(), GpuError> {
    let params =
        Params { n: to_u32(ZERO_FILL.name, "elements", tensor.len())?, seq: 0, hidden: 0, strips: 0 };
    let groups = spread(rec.gpu, params.n.div_ceil(256));
    rec.dispatch(&ZERO_FILL, "", &params, &[tensor], groups)
}

/// The gradients of all three tables from d_out [B * S, H]: zeroes each, then segment sums.
pub fn embedding_backward(
    rec: &mut Recorder,
    d_out: &Tensor,
    plan: &EmbeddingPlan,
    grads: &Embeddings,
) -> Result<(), GpuError> {
    grads.hidden("embedding_backward")?;
    let pairs = [(&plan.word, grads.word), (&plan.pos, grads.pos), (&plan.types, grads.types)];
    for (segments, grad) in pairs {
        zero_fill(rec, grad)?;
        segment_sum(rec, d_out, segments, grad)?;
    }
    Ok(())
}
