//! The encoder's input buffers of one (batch, seq) bucket, rewritten every step.

use super::blocks::{Alloc, Planned, allocate, plan_of, shape_error};
use super::{BertConfig, EncoderBatch};
use crate::gpu::{ElementType, Gpu, GpuError, Tensor};
use crate::kernels::embedding::{EmbeddingPlan, GpuSegmentPlan, SegmentPlan};

/// The segment plan buffers of one embedding table, sized for any batch of the bucket.
pub struct PlanBuffers<T> {
    /// Distinct ids: at most min(B·S, table rows).
    pub ids: T,
    pub offsets: T,
    /// B·S rows grouped by id.
    pub rows: T,
}

impl<T> PlanBuffers<T> {
    fn build(name: &str, rows: usize, table: usize, alloc: Alloc<T>) -> Result<Self, GpuError> {
        let segments = rows.min(table);
        Ok(PlanBuffers {
            ids: alloc(format!("{name}_plan.ids"), &[segments], ElementType::F32)?,
            offsets: alloc(format!("{name}_plan.offsets"), &[segments + 1], ElementType::F32)?,
            rows: alloc(format!("{name}_plan.rows"), &[rows], ElementType::F32)?,
        })
    }
}

/// The input buffers of one bucket.
pub struct InputSet<T> {
    /// Token ids [B, S] (u32).
    pub ids: T,
    /// Token types [B, S] (u32).
    pub type_ids: T,
    /// The additive attention mask (1 − mask)·(−10000) [B, S] (f32).
    pub mask: T,
    pub word: PlanBuffers<T>,
    pub types: PlanBuffers<T>,
    pub pos: PlanBuffers<T>,
}

impl<T> InputSet<T> {
    fn build(c: &BertConfig, batch: usize, seq: usize, alloc: Alloc<T>) -> Result<Self, GpuError> {
        let rows = batch * seq;
        Ok(InputSet {
            ids: alloc("input.ids".into(), &[batch, seq], ElementType::F32)?,
            type_ids: alloc("input.type_ids".into(), &[batch, seq], ElementType::F32)?,
            mask: alloc("input.mask".into(), &[batch, seq], ElementType::F32)?,
            word: PlanBuffers::build("word", rows, c.vocab_size, alloc)?,
            types: PlanBuffers::build("type", rows, c.type_vocab_size, alloc)?,
            pos: PlanBuffers::build("position", rows, seq, alloc)?,
        })
    }
}

/// Writes a host segment plan into preallocated buffers (one write each); returns it on the GPU.
fn write_plan(
    gpu: &Gpu,
    buffers: &PlanBuffers<Tensor>,
    plan: &SegmentPlan,
    vocab: usize,
) -> Result<GpuSegmentPlan, GpuError> {
    let gpu_plan = GpuSegmentPlan {
        ids: buffers.ids.view(&[plan.ids.len()]),
        offsets: buffers.offsets.view(&[plan.offsets.len()]),
        rows: buffers.rows.clone(),
        vocab,
    };
    gpu.write(&gpu_plan.ids, &plan.ids)?;
    gpu.write(&gpu_plan.offsets, &plan.offsets)?;
    gpu.write(&gpu_plan.rows, &plan.rows)?;
    Ok(gpu_plan)
}

/// A host [`EncoderBatch`] on the GPU: preallocated ids, types, additive mask and the
/// embedding backward's segment plans, rewritten by [`BatchInputs::write`] every step.
pub struct BatchInputs {
    pub batch: usize,
    pub seq: usize,
    pub buffers: InputSet<Tensor>,
    /// The current batch's plans: views of `buffers`.
    pub plan: EmbeddingPlan,
    pub all: Vec<Tensor>,
}

impl BatchInputs {
    /// Allocates the buffers of one (batch, seq) bucket; the position plan, which depends
    /// only on the shape, is written here once.
    pub fn new(gpu: &Gpu, c: &BertConfig, batch: usize, seq: usize) -> Result<BatchInputs, GpuError> {
        if seq > c.max_position_embeddings {
            let detail = format!("sequence length {seq} exceeds {} positions", c.max_position_embeddings);
            return Err(shape_error("BatchInputs::new", detail));
        }
        let (buffers, all) = allocate(gpu, |alloc| InputSet::build(c, batch, seq, alloc))?;
        let positions: Vec<u32> = (0..batch * seq).map(|r| (r % seq.max(1)) as u32).collect();
        let pos =
            write_plan(gpu, &buffers.pos, &SegmentPlan::new(&positions, seq)?, c.max_position_embeddings)?;
        let empty = |b: &PlanBuffers<Tensor>, vocab| GpuSegmentPlan {
            ids: b.ids.view(&[0]),
            offsets: b.offsets.view(&[1]),
            rows: b.rows.clone(),
            vocab,
        };
        let word = empty(&buffers.word, c.vocab_size);
        let types = empty(&buffers.types, c.type_vocab_size);
        Ok(BatchInputs { batch, seq, buffers, plan: EmbeddingPlan { word, pos, types }, all })
    }

    /// `new`, then `write`.
    pub fn upload(gpu: &Gpu, c: &BertConfig, host: &EncoderBatch) -> Result<BatchInputs, GpuError> {
        let mut inputs = BatchInputs::new(gpu, c, host.batch, host.seq)?;
        inputs.write(gpu, host)?;
        Ok(inputs)
    }

    /// (name, shape) of every buffer `new` allocates.
    pub fn plan(c: &BertConfig, batch: usize, seq: usize) -> Vec<Planned> {
        plan_of(|alloc| InputSet::build(c, batch, seq, alloc))
    }

    /// Writes a batch of this bucket's shape: ids, types, mask and the word and type plans.
    /// An error for another shape or an id past its table.
    pub fn write(&mut self, gpu: &Gpu, host: &EncoderBatch) -> Result<(), GpuError> {
        let rows = self.batch * self.seq;
        if host.batch != self.batch
            || host.seq != self.seq
            || host.ids.len() != rows
            || host.type_ids.len() != rows
            || host.mask.len() != rows
        {
            return Err(shape_error(
                "BatchInputs::write",
                format!(
                    "batch {}x{} with {} ids, {} types, {} mask values for buffers of {}x{}",
                    host.batch,
                    host.seq,
                    host.ids.len(),
                    host.type_ids.len(),
                    host.mask.len(),
                    self.batch,
                    self.seq
                ),
            ));
        }
        let (word_vocab, type_vocab) = (self.plan.word.vocab, self.plan.types.vocab);
        let word = SegmentPlan::new(&host.ids, word_vocab)?;
        let types = SegmentPlan::new(&host.type_ids, type_vocab)?;
        gpu.write(&self.buffers.ids, &host.ids)?;
        gpu.write(&self.buffers.type_ids, &host.type_ids)?;
        gpu.write(&self.buffers.mask, &host.additive_mask())?;
        self.plan.word = write_plan(gpu, &self.buffers.word, &word, word_vocab)?;
        self.plan.types = write_plan(gpu, &self.buffers.types, &types, type_vocab)?;
        Ok(())
    }
}
