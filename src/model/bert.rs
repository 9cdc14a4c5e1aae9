//! The BERT encoder and pooler on the GPU, forward and backward, as ordered kernel calls
//! (the formula and the dropout contract are in `model/mod.rs`).
//!
//! Memory: parameters and their gradients live in [`Bert`]; everything one (batch, seq)
//! bucket needs lives in [`Activations`], allocated once from a list of (name, shape) that
//! `model::memory` also reports, and reused every step. A step allocates no GPU memory
//! beyond what the recorder itself creates per submit (its parameter block, bind groups).
//!
//! Kept from the forward for the backward, per layer: the layer input, q, k, v, the
//! attention output and its log-sum-exps, both dropped-out sublayer outputs (the LayerNorm
//! inputs), the LayerNorm statistics, the attention block's output `a` and the FFN's
//! pre-activation. Recomputed in the backward: attention probabilities and all dropout
//! masks (by the kernels, from the same RNG streams) and GELU(pre-activation).
//!
//! Gradients are overwritten by every backward, never accumulated.

use std::collections::BTreeMap;

use super::{BertConfig, DropoutKey, EncoderBatch, HostTensor, SITE_EMBEDDINGS, Site, Weights};
use super::{dropout_stream, param_shapes, site};
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::kernels::attention::{self, AttentionShape};
use crate::kernels::elementwise::{self, DropoutSpec};
use crate::kernels::embedding::{self, EmbeddingPlan, Embeddings, GpuSegmentPlan, SegmentPlan};
use crate::kernels::layernorm::{self, LayerNorm, LayerNormGrads, LayerNormScratch, LayerNormStats};
use crate::kernels::matmul::{Epilogue, Matmul, matmul};
use crate::kernels::reduce;

pub(crate) fn shape_error(op: &str, detail: String) -> GpuError {
    GpuError::Shape { op: op.into(), detail }
}

/// One encoder layer's parameters (or gradients), by role.
#[derive(Clone)]
pub struct LayerTensors {
    pub query_w: Tensor,
    pub query_b: Tensor,
    pub key_w: Tensor,
    pub key_b: Tensor,
    pub value_w: Tensor,
    pub value_b: Tensor,
    pub attn_out_w: Tensor,
    pub attn_out_b: Tensor,
    pub ln1_gamma: Tensor,
    pub ln1_beta: Tensor,
    pub ffn_in_w: Tensor,
    pub ffn_in_b: Tensor,
    pub ffn_out_w: Tensor,
    pub ffn_out_b: Tensor,
    pub ln2_gamma: Tensor,
    pub ln2_beta: Tensor,
}

/// Every parameter (or gradient) of the encoder and pooler: by role for the kernels and by
/// Hugging Face name (in `param_shapes` order) for the host and the optimizer.
#[derive(Clone)]
pub struct ParamTensors {
    pub word: Tensor,
    pub pos: Tensor,
    pub types: Tensor,
    pub emb_ln_gamma: Tensor,
    pub emb_ln_beta: Tensor,
    pub layers: Vec<LayerTensors>,
    pub pooler_w: Tensor,
    pub pooler_b: Tensor,
    pub named: Vec<(String, Tensor)>,
}

impl ParamTensors {
    /// One tensor per entry of `param_shapes`, made by `make(name, shape)`.
    fn new(
        c: &BertConfig,
        mut make: impl FnMut(&str, &[usize]) -> Result<Tensor, GpuError>,
    ) -> Result<ParamTensors, GpuError> {
        let named = param_shapes(c)
            .into_iter()
            .map(|(name, shape)| Ok((name.clone(), make(&name, &shape)?)))
            .collect::<Result<Vec<_>, GpuError>>()?;
        let by_name: BTreeMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let get = |name: &str| by_name.get(name).map(|t| (*t).clone()).expect("name from param_shapes");
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let get = |name: &str| get(&format!("encoder.layer.{l}.{name}"));
                LayerTensors {
                    query_w: get("attention.self.query.weight"),
                    query_b: get("attention.self.query.bias"),
                    key_w: get("attention.self.key.weight"),
                    key_b: get("attention.self.key.bias"),
                    value_w: get("attention.self.value.weight"),
                    value_b: get("attention.self.value.bias"),
                    attn_out_w: get("attention.output.dense.weight"),
                    attn_out_b: get("attention.output.dense.bias"),
                    ln1_gamma: get("attention.output.LayerNorm.weight"),
                    ln1_beta: get("attention.output.LayerNorm.bias"),
                    ffn_in_w: get("intermediate.dense.weight"),
                    ffn_in_b: get("intermediate.dense.bias"),
                    ffn_out_w: get("output.dense.weight"),
                    ffn_out_b: get("output.dense.bias"),
                    ln2_gamma: get("output.LayerNorm.weight"),
                    ln2_beta: get("output.LayerNorm.bias"),
                }
            })
            .collect();
        Ok(ParamTensors {
            word: get("embeddings.word_embeddings.weight"),
            pos: get("embeddings.position_embeddings.weight"),
            types: get("embeddings.token_type_embeddings.weight"),
            emb_ln_gamma: get("embeddings.LayerNorm.weight"),
            emb_ln_beta: get("embeddings.LayerNorm.bias"),
            layers,
            pooler_w: get("pooler.dense.weight"),
            pooler_b: get("pooler.dense.bias"),
            named,
        })
    }

    fn embeddings(&self) -> Embeddings<'_> {
        Embeddings { word: &self.word, pos: &self.pos, types: &self.types }
    }

    /// Copies every tensor back to the host, by name.
    pub fn download(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        self.named
            .iter()
            .map(|(name, t)| Ok((name.clone(), HostTensor::new(&t.shape, gpu.read::<f32>(t)?))))
            .collect()
    }
}

/// What a builder calls for every buffer it needs: (name, shape) to a tensor, or to
/// nothing when only the list is wanted (the memory report).
pub(crate) type Alloc<'a, T> = &'a mut dyn FnMut(String, &[usize]) -> Result<T, GpuError>;

/// The (name, shape) list of what `build` allocates, without a GPU.
pub(crate) fn plan_of<S>(build: impl FnOnce(Alloc<()>) -> Result<S, GpuError>) -> Vec<(String, Vec<usize>)> {
    let mut list = Vec::new();
    build(&mut |name, shape| {
        list.push((name, shape.to_vec()));
        Ok(())
    })
    .expect("planning allocates nothing and cannot fail");
    list
}

/// Runs `build` allocating zeroed GPU tensors; returns its result and every tensor made.
pub(crate) fn allocate<S>(
    gpu: &Gpu,
    build: impl FnOnce(Alloc<Tensor>) -> Result<S, GpuError>,
) -> Result<(S, Vec<Tensor>), GpuError> {
    let mut all = Vec::new();
    let built = build(&mut |name, shape| {
        let tensor = gpu.zeros(&name, shape)?;
        all.push(tensor.clone());
        Ok(tensor)
    })?;
    Ok((built, all))
}

/// What one encoder layer's forward keeps for its backward (B·S rows, H hidden, I FFN).
pub struct LayerActs<T> {
    /// [B·S, H] = [B, S, heads, d]
    pub q: T,
    pub k: T,
    pub v: T,
    /// The attention output [B·S, H].
    pub ctx: T,
    /// Log-sum-exp of each attention row [B, heads, S].
    pub lse: T,
    /// Dropout_ao(ctx·Woᵀ + bo) [B·S, H]: LN1's input.
    pub attn_drop: T,
    pub ln1_mean: T,
    pub ln1_rstd: T,
    /// LN1's output [B·S, H]: the FFN's input and LN2's residual.
    pub a: T,
    /// a·W1ᵀ + b1 [B·S, I], the GELU's input.
    pub pre: T,
    /// Dropout_ffn(GELU(pre)·W2ᵀ + b2) [B·S, H]: LN2's input.
    pub ffn_drop: T,
    pub ln2_mean: T,
    pub ln2_rstd: T,
}

/// Every buffer the forward and backward of one (batch, seq) bucket use.
pub struct ActivationSet<T> {
    pub batch: usize,
    pub seq: usize,
    /// word + position + type embeddings [B·S, H]: LN_emb's input.
    pub emb_sum: T,
    pub emb_mean: T,
    pub emb_rstd: T,
    /// Layer inputs and outputs [B·S, H]: hidden[0] is the embeddings' output, hidden[L]
    /// the sequence output.
    pub hidden: Vec<T>,
    pub layers: Vec<LayerActs<T>>,
    /// tanh(seq[:, 0]·Wpᵀ + bp) [B, H].
    pub pooled: T,

    // Scratch, shared by all layers, forward and backward.
    /// [B, H]: forward, the pooler's pre-tanh; backward, its gradient.
    pub pooler: T,
    /// [B·S, H]: forward, a sublayer's output before its dropout; backward, a gradient
    /// after dropout's backward, then dq.
    pub sub: T,
    /// [B·S, I]: forward, GELU(pre); backward, GELU(pre) recomputed, then d pre.
    pub ffn_a: T,
    /// [B·S, I]: backward, d GELU(pre).
    pub ffn_b: T,
    /// [B·S, H]: the backward's ping-pong pair; grad_x holds d(layer output) between layers.
    pub grad_x: T,
    pub grad_y: T,
    /// [B·S, H]: attention's backward input and outputs (dq goes to `sub`).
    pub d_ctx: T,
    pub dk: T,
    pub dv: T,
    /// [B, heads, S]: rowsum(dO ⊙ O) for attention's backward.
    pub delta: T,
    /// LayerNorm backward's per-block partials.
    pub ln_partials: T,
    /// Partial sums of every column sum (bias and LayerNorm gradients).
    pub colsum: T,
    /// Every buffer above, for accounting.
    pub all: Vec<T>,
}

/// The GPU buffers of one bucket.
pub type Activations = ActivationSet<Tensor>;

impl<T> ActivationSet<T> {
    /// Asks `alloc` for every buffer: the one allocation plan.
    fn build(c: &BertConfig, batch: usize, seq: usize, alloc: Alloc<T>) -> Result<Self, GpuError> {
        let (h, i, heads, rows) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, batch * seq);
        let mut a = |name: &str, shape: &[usize]| alloc(name.to_string(), shape);
        let emb_sum = a("emb_sum", &[rows, h])?;
        let emb_mean = a("emb_mean", &[rows])?;
        let emb_rstd = a("emb_rstd", &[rows])?;
        let hidden = (0..=c.num_hidden_layers)
            .map(|l| a(&format!("hidden.{l}"), &[rows, h]))
            .collect::<Result<Vec<_>, _>>()?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let mut a = |name: &str, shape: &[usize]| a(&format!("layer.{l}.{name}"), shape);
            layers.push(LayerActs {
                q: a("q", &[rows, h])?,
                k: a("k", &[rows, h])?,
                v: a("v", &[rows, h])?,
                ctx: a("ctx", &[rows, h])?,
                lse: a("lse", &[batch, heads, seq])?,
                attn_drop: a("attn_drop", &[rows, h])?,
                ln1_mean: a("ln1_mean", &[rows])?,
                ln1_rstd: a("ln1_rstd", &[rows])?,
                a: a("a", &[rows, h])?,
                pre: a("pre", &[rows, i])?,
                ffn_drop: a("ffn_drop", &[rows, h])?,
                ln2_mean: a("ln2_mean", &[rows])?,
                ln2_rstd: a("ln2_rstd", &[rows])?,
            });
        }
        let colsum_len = [
            reduce::colsum_scratch_len(rows, i),
            reduce::colsum_scratch_len(rows, h),
            reduce::colsum_scratch_len(batch, h),
            layernorm::backward_scratch_len(rows, h).1,
        ];
        Ok(ActivationSet {
            batch,
            seq,
            emb_sum,
            emb_mean,
            emb_rstd,
            hidden,
            layers,
            pooled: a("pooled", &[batch, h])?,
            pooler: a("scratch.pooler", &[batch, h])?,
            sub: a("scratch.sub", &[rows, h])?,
            ffn_a: a("scratch.ffn_a", &[rows, i])?,
            ffn_b: a("scratch.ffn_b", &[rows, i])?,
            grad_x: a("scratch.grad_x", &[rows, h])?,
            grad_y: a("scratch.grad_y", &[rows, h])?,
            d_ctx: a("scratch.d_ctx", &[rows, h])?,
            dk: a("scratch.dk", &[rows, h])?,
            dv: a("scratch.dv", &[rows, h])?,
            delta: a("scratch.delta", &[batch, heads, seq])?,
            ln_partials: a("scratch.ln_partials", &[layernorm::backward_scratch_len(rows, h).0])?,
            colsum: a("scratch.colsum", &[colsum_len.into_iter().max().unwrap_or(0)])?,
            all: Vec::new(),
        })
    }

    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

impl Activations {
    /// Allocates the buffers of one (batch, seq) bucket.
    pub fn new(gpu: &Gpu, c: &BertConfig, batch: usize, seq: usize) -> Result<Activations, GpuError> {
        let (mut acts, all) = allocate(gpu, |alloc| ActivationSet::build(c, batch, seq, alloc))?;
        acts.all = all;
        Ok(acts)
    }

    /// (name, shape) of every buffer `new` allocates.
    pub fn plan(c: &BertConfig, batch: usize, seq: usize) -> Vec<(String, Vec<usize>)> {
        plan_of(|alloc| ActivationSet::build(c, batch, seq, alloc))
    }

    /// Bytes of GPU memory the buffers hold.
    pub fn bytes(&self) -> u64 {
        self.all.iter().map(|t| t.buffer.size()).sum()
    }
}

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
            ids: alloc(format!("{name}_plan.ids"), &[segments])?,
            offsets: alloc(format!("{name}_plan.offsets"), &[segments + 1])?,
            rows: alloc(format!("{name}_plan.rows"), &[rows])?,
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
            ids: alloc("input.ids".into(), &[batch, seq])?,
            type_ids: alloc("input.type_ids".into(), &[batch, seq])?,
            mask: alloc("input.mask".into(), &[batch, seq])?,
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
    pub fn plan(c: &BertConfig, batch: usize, seq: usize) -> Vec<(String, Vec<usize>)> {
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

/// The encoder and pooler: configuration, parameters and their gradients on the GPU.
pub struct Bert {
    pub config: BertConfig,
    pub params: ParamTensors,
    pub grads: ParamTensors,
}

/// Dropout at `site` with probability `p`, or none when the step has no key or p is 0.
pub(crate) fn dropout_spec(key: Option<DropoutKey>, p: f64, site: u32) -> Option<DropoutSpec> {
    let key = key?;
    (p > 0.0).then(|| DropoutSpec { p: p as f32, seed: key.seed, stream: dropout_stream(key.step, site) })
}

/// y = x: a dropout that drops nothing multiplies by exactly 1.
pub(crate) fn copy(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<(), GpuError> {
    elementwise::dropout(rec, x, y, DropoutSpec { p: 0.0, seed: 0, stream: 0 })
}

/// dy through dropout's backward (the same mask): into `scratch`, or dy itself without dropout.
pub(crate) fn dropout_backward<'t>(
    rec: &mut Recorder,
    dy: &'t Tensor,
    scratch: &'t Tensor,
    drop: Option<DropoutSpec>,
) -> Result<&'t Tensor, GpuError> {
    match drop {
        Some(spec) => {
            elementwise::dropout(rec, dy, scratch, spec)?;
            Ok(scratch)
        }
        None => Ok(dy),
    }
}

pub(crate) fn stats<'a>(mean: &'a Tensor, rstd: &'a Tensor) -> LayerNormStats<'a> {
    LayerNormStats { mean, rstd }
}

/// y = x·Wᵀ (+ epilogue) for x [rows, in] and W [out, in].
pub(crate) fn linear(
    rec: &mut Recorder,
    rows: usize,
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    epilogue: Epilogue,
) -> Result<(), GpuError> {
    let op = Matmul::new(rows, w.shape[0], w.shape[1]).trans_b();
    matmul(rec, x, w, y, &op, epilogue)
}

/// Where the parameter gradients of a Linear go: overwritten, or accumulated for a layer
/// shared by several call sites (PALs' encoder and decoder serve every layer).
pub(crate) struct LinearGrads<'t> {
    pub dw: &'t Tensor,
    pub db: &'t Tensor,
    pub accumulate: bool,
}

/// Gradients of y = x·Wᵀ + b from dy [rows, out]: db = colsum(dy), dW = dyᵀ·x (both
/// overwritten or accumulated), and dx = dy·W, or dx += dy·W with `Epilogue::Accumulate`,
/// when `dx` is given. `colsum_scratch` holds the column sum's partials.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    rec: &mut Recorder,
    rows: usize,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    grads: LinearGrads,
    dx: Option<(&Tensor, Epilogue)>,
    colsum_scratch: &Tensor,
) -> Result<(), GpuError> {
    let (out, inner) = (w.shape[0], w.shape[1]);
    reduce::colsum_with_scratch(rec, dy, grads.db, grads.accumulate, colsum_scratch)?;
    let dw_epilogue = if grads.accumulate { Epilogue::Accumulate } else { Epilogue::None };
    matmul(rec, dy, x, grads.dw, &Matmul::new(out, inner, rows).trans_a(), dw_epilogue)?;
    match dx {
        Some((dx, epilogue)) => matmul(rec, dy, w, dx, &Matmul::new(rows, inner, out), epilogue),
        None => Ok(()),
    }
}

/// Terms that a method adds inside every encoder layer, or after the last one (model/tasks.rs
/// implements them for PALs, low-rank layers, adapters and top projected attention). Every
/// point defaults to doing nothing, which is the plain encoder ([`NoHook`]). In layer l's
/// forward, with the hook's terms written T1, T2:
///
/// ```text
/// a   = LN1(attn_drop + h),  attn_drop = Dropout_ao(ctx·Woᵀ + bo) + T1   (attention_output)
/// out = LN2(ffn_drop + a),   ffn_drop  = Dropout_ffn(FFN(a)) + T2         (ffn_output)
/// ```
///
/// The backward calls, in layer l, in this order:
/// 1. `ffn_output_backward`: `acts.grad_y` holds d(LN2's input) = dT2; read it, don't write it.
/// 2. `ffn_input_backward`: `acts.grad_y` holds d a (LN2's residual and the FFN's share); add
///    the hook's share.
/// 3. `attention_output_backward`: `acts.grad_x` holds d(LN1's input) = dT1, which is also
///    d h through the residual, so it must stay as it is: return the tensor holding
///    d Dropout_ao(…) (`grad_x` itself, or a hook buffer with the hook's share added).
/// 4. `input_backward`: `acts.grad_x` holds d h; add the hook's share.
///
/// Two more points let a hook replace the sequence output (top projected attention):
/// - `sequence_output`, after the last layer and before the pooler: `acts.hidden[L]` holds
///   the last layer's output; the hook may overwrite it (saving what its backward needs),
///   and the pooler and the caller then read the replacement there.
/// - `sequence_output_backward`, first in the backward after the pooler's: `acts.grad_x`
///   holds d(sequence output) (d_seq plus the pooler's share); the hook leaves d(last
///   layer's output) there. `acts.colsum` is free to use.
pub trait LayerHook {
    fn attention_output(
        &self,
        _rec: &mut Recorder,
        _acts: &Activations,
        _inputs: &BatchInputs,
        _layer: usize,
        _key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    fn ffn_output(
        &self,
        _rec: &mut Recorder,
        _acts: &Activations,
        _inputs: &BatchInputs,
        _layer: usize,
        _key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    fn ffn_output_backward(
        &self,
        _rec: &mut Recorder,
        _acts: &Activations,
        _inputs: &BatchInputs,
        _layer: usize,
        _key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    fn ffn_input_backward(
        &self,
        _rec: &mut Recorder,
        _acts: &Activations,
        _layer: usize,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    fn attention_output_backward<'a>(
        &'a self,
        _rec: &mut Recorder,
        acts: &'a Activations,
        _layer: usize,
    ) -> Result<&'a Tensor, GpuError> {
        Ok(&acts.grad_x)
    }

    fn input_backward(
        &self,
        _rec: &mut Recorder,
        _acts: &Activations,
        _layer: usize,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    fn sequence_output(
        &self,
        _rec: &mut Recorder,
        _acts: &Activations,
        _inputs: &BatchInputs,
        _key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    fn sequence_output_backward(
        &self,
        _rec: &mut Recorder,
        _acts: &Activations,
        _inputs: &BatchInputs,
        _key: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        Ok(())
    }
}

/// The plain encoder: no task-specific terms.
pub struct NoHook;

impl LayerHook for NoHook {}

impl Bert {
    /// Uploads `weights` (named as `param_shapes`; extra entries are ignored) and allocates
    /// zeroed gradients. An error names any missing or mis-shaped tensor.
    pub fn upload(gpu: &Gpu, config: &BertConfig, weights: &Weights) -> Result<Bert, GpuError> {
        let op = "Bert::upload";
        let heads = config.num_attention_heads;
        if heads == 0 || !config.hidden_size.is_multiple_of(heads) {
            let detail = format!("hidden size {} is not a multiple of {heads} heads", config.hidden_size);
            return Err(shape_error(op, detail));
        }
        if config.hidden_act != "gelu" {
            return Err(shape_error(
                op,
                format!("hidden_act '{}' is not supported (gelu)", config.hidden_act),
            ));
        }
        let params = ParamTensors::new(config, |name, shape| {
            let host =
                weights.get(name).ok_or_else(|| shape_error(op, format!("missing tensor '{name}'")))?;
            if host.shape != shape || host.data.len() != shape.iter().product::<usize>() {
                let detail = format!("'{name}' has shape {:?}, expected {shape:?}", host.shape);
                return Err(shape_error(op, detail));
            }
            gpu.upload(name, shape, &host.data)
        })?;
        let grads = ParamTensors::new(config, |name, shape| gpu.zeros(&format!("grad {name}"), shape))?;
        Ok(Bert { config: config.clone(), params, grads })
    }

    pub fn download_weights(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        self.params.download(gpu)
    }

    pub fn download_grads(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        self.grads.download(gpu)
    }

    /// Sets every gradient to 0 (the backward overwrites them; this is for callers that
    /// read gradients without running one).
    pub fn zero_grads(&self, rec: &mut Recorder) -> Result<(), GpuError> {
        self.grads.named.iter().try_for_each(|(_, g)| embedding::zero_fill(rec, g))
    }

    /// The buffers of one (batch, seq) bucket.
    pub fn activations(&self, gpu: &Gpu, batch: usize, seq: usize) -> Result<Activations, GpuError> {
        Activations::new(gpu, &self.config, batch, seq)
    }

    fn check_bucket(&self, op: &str, acts: &Activations, inputs: &BatchInputs) -> Result<(), GpuError> {
        if acts.batch != inputs.batch
            || acts.seq != inputs.seq
            || acts.layers.len() != self.config.num_hidden_layers
        {
            let detail = format!(
                "activations for {}x{} ({} layers), inputs {}x{}",
                acts.batch,
                acts.seq,
                acts.layers.len(),
                inputs.batch,
                inputs.seq
            );
            return Err(shape_error(op, detail));
        }
        Ok(())
    }

    fn hidden_dropout(&self, key: Option<DropoutKey>, site: u32) -> Option<DropoutSpec> {
        dropout_spec(key, self.config.hidden_dropout_prob, site)
    }

    fn attention_dropout(&self, key: Option<DropoutKey>, layer: usize) -> DropoutSpec {
        let p = self.config.attention_probs_dropout_prob;
        dropout_spec(key, p, site(layer, Site::AttentionProbs)).unwrap_or(DropoutSpec {
            p: 0.0,
            seed: 0,
            stream: 0,
        })
    }

    fn attention_shape(&self, acts: &Activations) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            batch: acts.batch,
            seq: acts.seq,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        }
    }

    fn attention_scale(&self) -> f32 {
        (1.0 / (self.config.head_dim() as f64).sqrt()) as f32
    }

    fn layernorm<'a>(&self, gamma: &'a Tensor, beta: &'a Tensor) -> LayerNorm<'a> {
        LayerNorm { gamma, beta, eps: self.config.layer_norm_eps as f32 }
    }

    /// y = x·Wᵀ (+ epilogue) for x [B·S, in] and W [out, in].
    fn linear(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        epilogue: Epilogue,
    ) -> Result<(), GpuError> {
        linear(rec, acts.rows(), x, w, y, epilogue)
    }

    /// out = Dropout(x·Wᵀ + b): straight into `out` without dropout, else through `acts.sub`.
    #[allow(clippy::too_many_arguments)]
    fn linear_dropout(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        out: &Tensor,
        drop: Option<DropoutSpec>,
    ) -> Result<(), GpuError> {
        let target = if drop.is_some() { &acts.sub } else { out };
        self.linear(rec, acts, x, w, target, Epilogue::Bias(b))?;
        match drop {
            Some(spec) => elementwise::dropout(rec, &acts.sub, out, spec),
            None => Ok(()),
        }
    }

    /// Gradients of y = x·Wᵀ + b from dy [B·S, out]: db = colsum(dy), dW = dyᵀ·x and
    /// dx = dy·W, or dx += dy·W with `Epilogue::Accumulate`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        (dw, db): (&Tensor, &Tensor),
        dx: &Tensor,
        dx_epilogue: Epilogue,
    ) -> Result<(), GpuError> {
        let grads = LinearGrads { dw, db, accumulate: false };
        linear_backward(rec, acts.rows(), x, w, dy, grads, Some((dx, dx_epilogue)), &acts.colsum)
    }

    fn layernorm_backward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        ln: (&LayerNorm, LayerNormStats),
        (x, residual): (&Tensor, Option<&Tensor>),
        dy: &Tensor,
        grads: LayerNormGrads,
    ) -> Result<(), GpuError> {
        let scratch = LayerNormScratch { partials: &acts.ln_partials, colsum: Some(&acts.colsum) };
        layernorm::layernorm_backward_with_scratch(rec, ln.0, x, residual, &ln.1, dy, &grads, &scratch)
    }

    /// The sequence output (`acts.hidden[L]`, [B·S, H]) and pooled output (`acts.pooled`,
    /// [B, H]) of the batch in `inputs`, with dropout when `dropout` is given.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        dropout: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        self.forward_with(rec, acts, inputs, dropout, &NoHook)
    }

    /// `forward` with the terms of `hook` inside every layer.
    pub fn forward_with(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        dropout: Option<DropoutKey>,
        hook: &dyn LayerHook,
    ) -> Result<(), GpuError> {
        self.check_bucket("Bert::forward", acts, inputs)?;
        let p = &self.params;
        let input = &inputs.buffers;
        embedding::embedding_forward(rec, &input.ids, &input.type_ids, &p.embeddings(), &acts.emb_sum)?;
        let drop = self.hidden_dropout(dropout, SITE_EMBEDDINGS);
        let ln_out = if drop.is_some() { &acts.sub } else { &acts.hidden[0] };
        let ln = self.layernorm(&p.emb_ln_gamma, &p.emb_ln_beta);
        layernorm::layernorm_forward(
            rec,
            &ln,
            &acts.emb_sum,
            None,
            ln_out,
            &stats(&acts.emb_mean, &acts.emb_rstd),
        )?;
        if let Some(spec) = drop {
            elementwise::dropout(rec, &acts.sub, &acts.hidden[0], spec)?;
        }
        for l in 0..self.config.num_hidden_layers {
            self.layer_forward(rec, acts, inputs, l, dropout, hook)?;
        }
        hook.sequence_output(rec, acts, inputs, dropout)?;
        self.pooler_forward(rec, acts)
    }

    fn layer_forward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        l: usize,
        key: Option<DropoutKey>,
        hook: &dyn LayerHook,
    ) -> Result<(), GpuError> {
        let (p, x) = (&self.params.layers[l], &acts.layers[l]);
        let (h_in, h_out) = (&acts.hidden[l], &acts.hidden[l + 1]);
        for (w, b, out) in
            [(&p.query_w, &p.query_b, &x.q), (&p.key_w, &p.key_b, &x.k), (&p.value_w, &p.value_b, &x.v)]
        {
            self.linear(rec, acts, h_in, w, out, Epilogue::Bias(b))?;
        }
        let (shape, scale, attn_drop) =
            (self.attention_shape(acts), self.attention_scale(), self.attention_dropout(key, l));
        let mask = &inputs.buffers.mask;
        attention::attention_forward(rec, shape, &x.q, &x.k, &x.v, mask, &x.ctx, &x.lse, scale, attn_drop)?;
        let drop = self.hidden_dropout(key, site(l, Site::AttentionOutput));
        self.linear_dropout(rec, acts, &x.ctx, &p.attn_out_w, &p.attn_out_b, &x.attn_drop, drop)?;
        hook.attention_output(rec, acts, inputs, l, key)?;
        let ln1 = self.layernorm(&p.ln1_gamma, &p.ln1_beta);
        layernorm::layernorm_forward(
            rec,
            &ln1,
            &x.attn_drop,
            Some(h_in),
            &x.a,
            &stats(&x.ln1_mean, &x.ln1_rstd),
        )?;
        let gelu = Epilogue::BiasGelu { bias: &p.ffn_in_b, pre: &x.pre };
        self.linear(rec, acts, &x.a, &p.ffn_in_w, &acts.ffn_a, gelu)?;
        let drop = self.hidden_dropout(key, site(l, Site::FfnOutput));
        self.linear_dropout(rec, acts, &acts.ffn_a, &p.ffn_out_w, &p.ffn_out_b, &x.ffn_drop, drop)?;
        hook.ffn_output(rec, acts, inputs, l, key)?;
        let ln2 = self.layernorm(&p.ln2_gamma, &p.ln2_beta);
        layernorm::layernorm_forward(
            rec,
            &ln2,
            &x.ffn_drop,
            Some(&x.a),
            h_out,
            &stats(&x.ln2_mean, &x.ln2_rstd),
        )
    }

    /// pooled = tanh(seq[:, 0]·Wpᵀ + bp): the matmul reads row 0 of each sequence by
    /// striding A's rows by S·H.
    fn pooler_forward(&self, rec: &mut Recorder, acts: &Activations) -> Result<(), GpuError> {
        let (b, s, h) = (acts.batch, acts.seq, self.config.hidden_size);
        let p = &self.params;
        let seq_out = &acts.hidden[self.config.num_hidden_layers];
        let op = Matmul { lda: Some(s * h), ..Matmul::new(b, h, h).trans_b() };
        matmul(rec, seq_out, &p.pooler_w, &acts.pooler, &op, Epilogue::Bias(&p.pooler_b))?;
        elementwise::tanh(rec, &acts.pooler, &acts.pooled)
    }

    /// Every parameter gradient (overwritten) from the gradients of the sequence output
    /// `d_seq` [B·S, H] and of the pooled output `d_pooled` [B, H], after `forward` on the
    /// same `acts`, `inputs` and `dropout`.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        d_seq: &Tensor,
        d_pooled: &Tensor,
        dropout: Option<DropoutKey>,
    ) -> Result<(), GpuError> {
        self.backward_with(rec, acts, inputs, Some(d_seq), d_pooled, dropout, &NoHook)
    }

    /// `backward` after `forward_with` the same `hook`; `d_seq` None means a zero gradient
    /// of the sequence output (a loss on the pooled output alone).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        d_seq: Option<&Tensor>,
        d_pooled: &Tensor,
        dropout: Option<DropoutKey>,
        hook: &dyn LayerHook,
    ) -> Result<(), GpuError> {
        self.check_bucket("Bert::backward", acts, inputs)?;
        self.pooler_backward(rec, acts, d_seq, d_pooled)?;
        hook.sequence_output_backward(rec, acts, inputs, dropout)?;
        for l in (0..self.config.num_hidden_layers).rev() {
            self.layer_backward(rec, acts, inputs, l, dropout, hook)?;
        }
        let (p, g) = (&self.params, &self.grads);
        let d_ln =
            dropout_backward(rec, &acts.grad_x, &acts.sub, self.hidden_dropout(dropout, SITE_EMBEDDINGS))?;
        let ln = self.layernorm(&p.emb_ln_gamma, &p.emb_ln_beta);
        let grads = LayerNormGrads { dx: &acts.grad_y, dgamma: &g.emb_ln_gamma, dbeta: &g.emb_ln_beta };
        let ln_stats = stats(&acts.emb_mean, &acts.emb_rstd);
        self.layernorm_backward(rec, acts, (&ln, ln_stats), (&acts.emb_sum, None), d_ln, grads)?;
        embedding::embedding_backward(rec, &acts.grad_y, &inputs.plan, &g.embeddings())
    }

    /// Pooler gradients; leaves d(sequence output) = d_seq (or 0) + the pooler's share in
    /// grad_x.
    fn pooler_backward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        d_seq: Option<&Tensor>,
        d_pooled: &Tensor,
    ) -> Result<(), GpuError> {
        let (b, s, h) = (acts.batch, acts.seq, self.config.hidden_size);
        let (p, g) = (&self.params, &self.grads);
        let seq_out = &acts.hidden[self.config.num_hidden_layers];
        elementwise::tanh_backward(rec, &acts.pooled, d_pooled, &acts.pooler)?;
        reduce::colsum_with_scratch(rec, &acts.pooler, &g.pooler_b, false, &acts.colsum)?;
        let dw = Matmul { ldb: Some(s * h), ..Matmul::new(h, h, b).trans_a() };
        matmul(rec, &acts.pooler, seq_out, &g.pooler_w, &dw, Epilogue::None)?;
        match d_seq {
            Some(d_seq) => copy(rec, d_seq, &acts.grad_x)?,
            None => embedding::zero_fill(rec, &acts.grad_x)?,
        }
        let dx = Matmul { ldc: Some(s * h), ..Matmul::new(b, h, h) };
        matmul(rec, &acts.pooler, &p.pooler_w, &acts.grad_x, &dx, Epilogue::Accumulate)
    }

    /// One layer's gradients from d(layer output) in grad_x; leaves d(layer input) there.
    fn layer_backward(
        &self,
        rec: &mut Recorder,
        acts: &Activations,
        inputs: &BatchInputs,
        l: usize,
        key: Option<DropoutKey>,
        hook: &dyn LayerHook,
    ) -> Result<(), GpuError> {
        let (p, g, x) = (&self.params.layers[l], &self.grads.layers[l], &acts.layers[l]);
        let h_in = &acts.hidden[l];
        // out = LN2(ffn_drop + a): grad_y = d ffn_drop = d a through the residual.
        let ln2 = self.layernorm(&p.ln2_gamma, &p.ln2_beta);
        let grads = LayerNormGrads { dx: &acts.grad_y, dgamma: &g.ln2_gamma, dbeta: &g.ln2_beta };
        let ln_stats = stats(&x.ln2_mean, &x.ln2_rstd);
        self.layernorm_backward(rec, acts, (&ln2, ln_stats), (&x.ffn_drop, Some(&x.a)), &acts.grad_x, grads)?;
        hook.ffn_output_backward(rec, acts, inputs, l, key)?;
        let drop = self.hidden_dropout(key, site(l, Site::FfnOutput));
        let d_ffn_out = dropout_backward(rec, &acts.grad_y, &acts.sub, drop)?;
        // The FFN: GELU(pre) is recomputed rather than kept; d pre ends in ffn_a.
        elementwise::gelu(rec, &x.pre, &acts.ffn_a)?;
        let ffn_out_grads = (&g.ffn_out_w, &g.ffn_out_b);
        self.linear_backward(
            rec,
            acts,
            &acts.ffn_a,
            &p.ffn_out_w,
            d_ffn_out,
            ffn_out_grads,
            &acts.ffn_b,
            Epilogue::None,
        )?;
        elementwise::gelu_backward(rec, &x.pre, &acts.ffn_b, &acts.ffn_a)?;
        let ffn_in_grads = (&g.ffn_in_w, &g.ffn_in_b);
        self.linear_backward(
            rec,
            acts,
            &x.a,
            &p.ffn_in_w,
            &acts.ffn_a,
            ffn_in_grads,
            &acts.grad_y,
            Epilogue::Accumulate,
        )?;
        hook.ffn_input_backward(rec, acts, l)?;
        // a = LN1(attn_drop + h): grad_x = d attn_drop = d h through the residual.
        let ln1 = self.layernorm(&p.ln1_gamma, &p.ln1_beta);
        let grads = LayerNormGrads { dx: &acts.grad_x, dgamma: &g.ln1_gamma, dbeta: &g.ln1_beta };
        let ln_stats = stats(&x.ln1_mean, &x.ln1_rstd);
        self.layernorm_backward(
            rec,
            acts,
            (&ln1, ln_stats),
            (&x.attn_drop, Some(h_in)),
            &acts.grad_y,
            grads,
        )?;
        let d_attn_drop = hook.attention_output_backward(rec, acts, l)?;
        let drop = self.hidden_dropout(key, site(l, Site::AttentionOutput));
        let d_attn_out = dropout_backward(rec, d_attn_drop, &acts.sub, drop)?;
        let attn_out_grads = (&g.attn_out_w, &g.attn_out_b);
        self.linear_backward(
            rec,
            acts,
            &x.ctx,
            &p.attn_out_w,
            d_attn_out,
            attn_out_grads,
            &acts.d_ctx,
            Epilogue::None,
        )?;
        let (shape, scale, attn_drop) =
            (self.attention_shape(acts), self.attention_scale(), self.attention_dropout(key, l));
        let (mask, dq) = (&inputs.buffers.mask, &acts.sub);
        #[rustfmt::skip]
        attention::attention_backward(
            rec, shape, &x.q, &x.k, &x.v, &x.ctx, &acts.d_ctx, mask, &x.lse, &acts.delta,
            dq, &acts.dk, &acts.dv, scale, attn_drop,
        )?;
        let projections = [
            (dq, &p.query_w, (&g.query_w, &g.query_b)),
            (&acts.dk, &p.key_w, (&g.key_w, &g.key_b)),
            (&acts.dv, &p.value_w, (&g.value_w, &g.value_b)),
        ];
        for (dy, w, grads) in projections {
            self.linear_backward(rec, acts, h_in, w, dy, grads, &acts.grad_x, Epilogue::Accumulate)?;
        }
        hook.input_backward(rec, acts, l)
    }
}
