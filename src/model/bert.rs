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
//! Gradients are overwritten by every backward, never accumulated. A model uploaded for
//! inference ([`Bert::upload_inference`]) has no gradients, and its buffers hold only what
//! a forward needs: no backward scratch, one set of layer buffers that every layer reuses,
//! and two layer outputs in turn.

use std::collections::BTreeMap;

use super::blocks::{
    Alloc, AttentionActs, AttentionBlock, AttentionScratch, AttentionStep, GradMode, Linear, Norm,
    OutputGrad, Planned, allocate, copy, dropout_backward, dropout_finish, dropout_target, in_turn,
    per_layer, plan_of, shape_error, stats,
};
use super::hook::{HookStep, LayerHook, NoHook};
use super::{BertConfig, DropoutKey, HostTensor, SITE_EMBEDDINGS, Site, Weights, param_shapes, site};
use crate::contract::{AttentionShape, DropoutSpec};
use crate::error::ModelError;
use crate::gpu::ElementType::{self, F32};
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::kernels::cast;
use crate::kernels::elementwise;
use crate::kernels::embedding::{self, Embeddings};
use crate::kernels::layernorm::{self, LayerNormScratch};
use crate::kernels::matmul::{Epilogue, Matmul, matmul};
use crate::kernels::reduce;

pub use super::inputs::{BatchInputs, InputSet, PlanBuffers};

/// One encoder layer's parameters (or gradients), by role: the attention sublayer (its
/// LayerNorm is LN1), the FFN's two Linears and LN2.
#[derive(Clone)]
pub struct LayerTensors {
    pub attention: AttentionBlock,
    pub ffn_in: Linear,
    pub ffn_out: Linear,
    pub ln2: Norm,
}

/// Every parameter (or gradient) of the encoder and pooler: by role for the kernels and by
/// Hugging Face name (in `param_shapes` order) for the host and the optimizer.
#[derive(Clone)]
pub struct ParamTensors {
    pub word: Tensor,
    pub pos: Tensor,
    pub types: Tensor,
    pub emb_ln: Norm,
    pub layers: Vec<LayerTensors>,
    pub pooler: Linear,
    pub named: Vec<(String, Tensor)>,
}

/// Named tensors, found by name (names come from a shape list, so each is there).
pub struct ByName<'a>(BTreeMap<&'a str, &'a Tensor>);

impl<'a> ByName<'a> {
    pub fn new(named: &'a [(String, Tensor)]) -> ByName<'a> {
        ByName(named.iter().map(|(n, t)| (n.as_str(), t)).collect())
    }

    pub(crate) fn get(&self, name: &str) -> Tensor {
        self.0
            .get(name)
            .map(|t| (*t).clone())
            .unwrap_or_else(|| panic!("no tensor '{name}' in the shape list"))
    }

    /// `{name}.weight` and `{name}.bias`.
    pub(crate) fn linear(&self, name: &str) -> Linear {
        Linear { w: self.get(&format!("{name}.weight")), b: self.get(&format!("{name}.bias")), w16: None }
    }

    pub(crate) fn norm(&self, name: &str) -> Norm {
        let Linear { w, b, .. } = self.linear(name);
        Norm { gamma: w, beta: b }
    }
}

/// One tensor per (name, shape) from `make(name, shape)`.
pub(crate) fn make_named<E>(
    shapes: Vec<(String, Vec<usize>)>,
    mut make: impl FnMut(&str, &[usize]) -> Result<Tensor, E>,
) -> Result<Vec<(String, Tensor)>, E> {
    shapes.into_iter().map(|(name, shape)| Ok((name.clone(), make(&name, &shape)?))).collect()
}

/// Uploads the tensor `name` of `weights`: an error if it is missing or mis-shaped.
pub(crate) fn upload_named(
    gpu: &Gpu,
    weights: &Weights,
    name: &str,
    shape: &[usize],
) -> Result<Tensor, ModelError> {
    let host = weights.get(name).ok_or_else(|| ModelError::weights(name, "is missing"))?;
    if host.shape != shape || host.data.len() != shape.iter().product::<usize>() {
        return Err(ModelError::weights(name, format!("has shape {:?}, expected {shape:?}", host.shape)));
    }
    Ok(gpu.upload(name, shape, &host.data)?)
}

/// Copies named tensors back to the host.
pub(crate) fn download_named(gpu: &Gpu, named: &[(String, Tensor)]) -> Result<Weights, GpuError> {
    named.iter().map(|(name, t)| Ok((name.clone(), HostTensor::new(&t.shape, gpu.read::<f32>(t)?)))).collect()
}

impl ParamTensors {
    /// One tensor per entry of `param_shapes`, made by `make(name, shape)`.
    fn new<E>(
        c: &BertConfig,
        make: impl FnMut(&str, &[usize]) -> Result<Tensor, E>,
    ) -> Result<ParamTensors, E> {
        let named = make_named(param_shapes(c), make)?;
        let t = ByName::new(&named);
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}.");
                let linear = |name: &str| t.linear(&format!("{p}{name}"));
                LayerTensors {
                    attention: AttentionBlock {
                        qkv: ["query", "key", "value"].map(|w| linear(&format!("attention.self.{w}"))),
                        output: linear("attention.output.dense"),
                        norm: t.norm(&format!("{p}attention.output.LayerNorm")),
                    },
                    ffn_in: linear("intermediate.dense"),
                    ffn_out: linear("output.dense"),
                    ln2: t.norm(&format!("{p}output.LayerNorm")),
                }
            })
            .collect();
        Ok(ParamTensors {
            word: t.get("embeddings.word_embeddings.weight"),
            pos: t.get("embeddings.position_embeddings.weight"),
            types: t.get("embeddings.token_type_embeddings.weight"),
            emb_ln: t.norm("embeddings.LayerNorm"),
            layers,
            pooler: t.linear("pooler.dense"),
            named,
        })
    }

    fn embeddings(&self) -> Embeddings<'_> {
        Embeddings { word: &self.word, pos: &self.pos, types: &self.types }
    }

    /// Copies every tensor back to the host, by name.
    pub fn download(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        download_named(gpu, &self.named)
    }
}

/// What one encoder layer's forward keeps for its backward (B·S rows, H hidden, I FFN).
#[derive(Clone)]
pub struct LayerActs<T> {
    /// The attention sublayer's: q, k, v, ctx, lse, and LN1's input Dropout_ao(ctx·Woᵀ +
    /// bo) (`out`, named attn_drop) and statistics.
    pub attention: AttentionActs<T>,
    /// LN1's output [B·S, H]: the FFN's input and LN2's residual.
    pub a: T,
    /// a·W1ᵀ + b1 [B·S, I], the GELU's input.
    pub pre: T,
    /// Dropout_ffn(GELU(pre)·W2ᵀ + b2) [B·S, H]: LN2's input.
    pub ffn_drop: T,
    pub ln2_mean: T,
    pub ln2_rstd: T,
}

/// Every buffer the forward and backward of one (batch, seq) bucket use. Without
/// `training` the backward-only buffers are empty and the layers share their buffers.
pub struct ActivationSet<T> {
    pub batch: usize,
    pub seq: usize,
    pub training: bool,
    /// word + position + type embeddings [B·S, H]: LN_emb's input.
    pub emb_sum: T,
    pub emb_mean: T,
    pub emb_rstd: T,
    /// Layer inputs and outputs [B·S, H]: hidden[0] is the embeddings' output, hidden[L]
    /// the sequence output. Inference keeps two buffers, taken in turn.
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
    /// Backward only, from here on.
    /// [B·S, I]: d GELU(pre).
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

/// The storage of the activations mixed precision (`mixed`) keeps in f16: q, k, v and the
/// FFN's intermediates (`ActivationSet::build`).
pub fn half_storage(mixed: bool) -> ElementType {
    if mixed { ElementType::F16 } else { ElementType::F32 }
}

/// The GPU buffers of one bucket.
pub type Activations = ActivationSet<Tensor>;

/// The encoder's attention shape for a (batch, seq) bucket.
fn attention_shape(c: &BertConfig, batch: usize, seq: usize) -> AttentionShape {
    AttentionShape { batch, seq, heads: c.num_attention_heads, head_dim: c.head_dim() }
}

impl<T: Clone> ActivationSet<T> {
    /// Asks `alloc` for every buffer: the one allocation plan.
    fn build(
        c: &BertConfig,
        batch: usize,
        seq: usize,
        training: bool,
        half: ElementType,
        alloc: Alloc<T>,
    ) -> Result<Self, GpuError> {
        let (h, i, heads, rows) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, batch * seq);
        // Backward-only buffers are empty for inference.
        let (brows, bbatch) = if training { (rows, batch) } else { (0, 0) };
        // `half` is the storage of the activations only matmuls and kernels with f16 variants
        // touch (f16 in mixed precision): q, k, v and the FFN's [B·S, I] intermediates, the
        // largest ones. Everything else is f32.
        let mut a = |name: &str, shape: &[usize], dtype| alloc(name.to_string(), shape, dtype);
        let emb_sum = a("emb_sum", &[rows, h], F32)?;
        let emb_mean = a("emb_mean", &[rows], F32)?;
        let emb_rstd = a("emb_rstd", &[rows], F32)?;
        let hidden =
            in_turn(c.num_hidden_layers + 1, training, |l| a(&format!("hidden.{l}"), &[rows, h], F32))?;
        let shape = attention_shape(c, batch, seq);
        let layers = per_layer(c.num_hidden_layers, training, |l| {
            let mut a = |name: &str, shape: &[usize], dtype| a(&format!("layer.{l}.{name}"), shape, dtype);
            Ok(LayerActs {
                attention: AttentionActs::build(shape, ["attn_drop", "ln1_mean", "ln1_rstd"], half, &mut a)?,
                a: a("a", &[rows, h], F32)?,
                pre: a("pre", &[rows, i], half)?,
                ffn_drop: a("ffn_drop", &[rows, h], F32)?,
                ln2_mean: a("ln2_mean", &[rows], F32)?,
                ln2_rstd: a("ln2_rstd", &[rows], F32)?,
            })
        })?;
        let colsum_len = [
            reduce::colsum_scratch_len(brows, i),
            reduce::colsum_scratch_len(brows, h),
            reduce::colsum_scratch_len(bbatch, h),
            layernorm::backward_scratch_len(brows, h).1,
        ];
        Ok(ActivationSet {
            batch,
            seq,
            training,
            emb_sum,
            emb_mean,
            emb_rstd,
            hidden,
            layers,
            pooled: a("pooled", &[batch, h], F32)?,
            pooler: a("scratch.pooler", &[batch, h], F32)?,
            sub: a("scratch.sub", &[rows, h], F32)?,
            ffn_a: a("scratch.ffn_a", &[rows, i], half)?,
            ffn_b: a("scratch.ffn_b", &[brows, i], half)?,
            grad_x: a("scratch.grad_x", &[brows, h], F32)?,
            grad_y: a("scratch.grad_y", &[brows, h], F32)?,
            d_ctx: a("scratch.d_ctx", &[brows, h], F32)?,
            dk: a("scratch.dk", &[brows, h], F32)?,
            dv: a("scratch.dv", &[brows, h], F32)?,
            delta: a("scratch.delta", &[bbatch, heads, seq], F32)?,
            ln_partials: a("scratch.ln_partials", &[layernorm::backward_scratch_len(brows, h).0], F32)?,
            colsum: a("scratch.colsum", &[colsum_len.into_iter().max().unwrap_or(0)], F32)?,
            all: Vec::new(),
        })
    }
}

impl<T> ActivationSet<T> {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

impl Activations {
    /// Allocates the buffers of one (batch, seq) bucket, for training or inference only.
    pub fn new(
        gpu: &Gpu,
        c: &BertConfig,
        batch: usize,
        seq: usize,
        training: bool,
        half: ElementType,
    ) -> Result<Activations, GpuError> {
        let (mut acts, all) =
            allocate(gpu, |alloc| ActivationSet::build(c, batch, seq, training, half, alloc))?;
        acts.all = all;
        Ok(acts)
    }

    /// (name, shape, type) of every buffer `new` allocates for f32 training.
    pub fn plan(c: &BertConfig, batch: usize, seq: usize) -> Vec<Planned> {
        Activations::plan_for(c, batch, seq, true, ElementType::F32)
    }

    /// (name, shape, type) of every buffer `new` allocates.
    pub fn plan_for(
        c: &BertConfig,
        batch: usize,
        seq: usize,
        training: bool,
        half: ElementType,
    ) -> Vec<Planned> {
        plan_of(|alloc| ActivationSet::build(c, batch, seq, training, half, alloc))
    }

    /// Bytes of GPU memory the buffers hold.
    pub fn bytes(&self) -> u64 {
        self.all.iter().map(|t| t.buffer.size()).sum()
    }

    /// The attention sublayer's scratch (dq shares `sub`).
    fn attention_scratch(&self) -> AttentionScratch<'_> {
        AttentionScratch {
            sub: &self.sub,
            d_ctx: &self.d_ctx,
            dq: &self.sub,
            dk: &self.dk,
            dv: &self.dv,
            delta: &self.delta,
            ln: self.ln_scratch(),
            colsum: &self.colsum,
        }
    }

    fn ln_scratch(&self) -> LayerNormScratch<'_> {
        LayerNormScratch { partials: &self.ln_partials, colsum: Some(&self.colsum) }
    }
}

/// The encoder and pooler: configuration, parameters and their gradients on the GPU (no
/// gradients when uploaded for inference).
pub struct Bert {
    pub config: BertConfig,
    pub params: ParamTensors,
    pub grads: Option<ParamTensors>,
}

/// An error unless the GPU encoder can run configuration `c`.
pub(crate) fn check_config(c: &BertConfig) -> Result<(), ModelError> {
    let heads = c.num_attention_heads;
    if heads == 0 || !c.hidden_size.is_multiple_of(heads) {
        let message = format!("{} is not a multiple of {heads} heads", c.hidden_size);
        return Err(ModelError::config("hidden_size", message));
    }
    if !crate::model::config::SUPPORTED_ACTS.contains(&c.hidden_act.as_str()) {
        return Err(ModelError::config("hidden_act", format!("'{}' is not supported (gelu)", c.hidden_act)));
    }
    Ok(())
}

impl Bert {
    /// Mixed precision: gives each encoder layer's Linears (Q, K, V, attention output, FFN
    /// in and out: the big products) an f16 copy of W that their products read, cast from
    /// the f32 weights now; again (the same copies) after the weights were overwritten.
    /// Returns (weight name, copy) for the optimizer, which keeps them current.
    pub fn use_f16_weights(&mut self, gpu: &Gpu) -> Result<Vec<(String, Tensor)>, GpuError> {
        let mut copies = Vec::new();
        let mut rec = gpu.recorder();
        for (l, layer) in self.params.layers.iter_mut().enumerate() {
            let attention = &mut layer.attention;
            let [q, k, v] = &mut attention.qkv;
            let sites = [
                ("attention.self.query", q),
                ("attention.self.key", k),
                ("attention.self.value", v),
                ("attention.output.dense", &mut attention.output),
                ("intermediate.dense", &mut layer.ffn_in),
                ("output.dense", &mut layer.ffn_out),
            ];
            for (site, linear) in sites {
                let name = format!("encoder.layer.{l}.{site}.weight");
                let copy = match &linear.w16 {
                    Some(copy) => copy.clone(),
                    None => gpu.zeros_of(&format!("{name} f16"), &linear.w.shape, ElementType::F16)?,
                };
                cast::cast_f16(&mut rec, &linear.w, &copy)?;
                linear.w16 = Some(copy.clone());
                copies.push((name, copy));
            }
        }
        rec.submit()?;
        Ok(copies)
    }

    /// Uploads `weights` (named as `param_shapes`; extra entries are ignored) and allocates
    /// zeroed gradients. An error names any missing or mis-shaped tensor.
    pub fn upload(gpu: &Gpu, config: &BertConfig, weights: &Weights) -> Result<Bert, ModelError> {
        let mut bert = Bert::upload_inference(gpu, config, weights)?;
        bert.grads =
            Some(ParamTensors::new(config, |name, shape| gpu.zeros(&format!("grad {name}"), shape))?);
        Ok(bert)
    }

    /// `upload` without gradients: a model that can only run forwards.
    pub fn upload_inference(gpu: &Gpu, config: &BertConfig, weights: &Weights) -> Result<Bert, ModelError> {
        check_config(config)?;
        let params = ParamTensors::new(config, |name, shape| upload_named(gpu, weights, name, shape))?;
        Ok(Bert { config: config.clone(), params, grads: None })
    }

    pub fn training(&self) -> bool {
        self.grads.is_some()
    }

    /// The gradients: an error for a model uploaded for inference.
    pub fn grads(&self) -> Result<&ParamTensors, GpuError> {
        self.grads.as_ref().ok_or_else(|| shape_error("Bert", "an inference model has no gradients".into()))
    }

    pub fn download_weights(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        self.params.download(gpu)
    }

    pub fn download_grads(&self, gpu: &Gpu) -> Result<Weights, GpuError> {
        self.grads()?.download(gpu)
    }

    /// Sets every gradient to 0 (the backward overwrites them; this is for callers that
    /// read gradients without running one).
    pub fn zero_grads(&self, rec: &mut Recorder) -> Result<(), GpuError> {
        self.grads()?.named.iter().try_for_each(|(_, g)| embedding::zero_fill(rec, g))
    }

    /// The buffers of one (batch, seq) bucket: for training when the model has gradients.
    pub fn activations(&self, gpu: &Gpu, batch: usize, seq: usize) -> Result<Activations, GpuError> {
        Activations::new(gpu, &self.config, batch, seq, self.training(), self.half_storage())
    }

    /// The storage of the activations that mixed precision keeps in f16 (q, k, v and the
    /// FFN's intermediates, see `ActivationSet::build`): f16 once the encoder reads f16
    /// weight copies (`use_f16_weights`), else f32.
    pub fn half_storage(&self) -> ElementType {
        half_storage(self.params.layers.iter().any(|layer| layer.ffn_in.w16.is_some()))
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
        DropoutSpec::at(key, self.config.hidden_dropout_prob, site)
    }

    /// Layer l's attention sublayer step: shape, mask and dropouts.
    fn attention_step<'a>(&self, s: &HookStep<'a>, l: usize) -> AttentionStep<'a> {
        let c = &self.config;
        AttentionStep {
            shape: attention_shape(c, s.acts.batch, s.acts.seq),
            mask: &s.inputs.buffers.mask,
            probs_drop: DropoutSpec::at_or_none(
                s.key,
                c.attention_probs_dropout_prob,
                site(l, Site::AttentionProbs),
            ),
            out_drop: self.hidden_dropout(s.key, site(l, Site::AttentionOutput)),
        }
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
        let (p, input, eps) = (&self.params, &inputs.buffers, self.config.layer_norm_eps);
        embedding::embedding_forward(rec, &input.ids, &input.type_ids, &p.embeddings(), &acts.emb_sum)?;
        let drop = self.hidden_dropout(dropout, SITE_EMBEDDINGS);
        let ln_out = dropout_target(&acts.hidden[0], &acts.sub, drop);
        let ln_stats = stats(&acts.emb_mean, &acts.emb_rstd);
        layernorm::layernorm_forward(rec, &p.emb_ln.layernorm(eps), &acts.emb_sum, None, ln_out, &ln_stats)?;
        dropout_finish(rec, &acts.sub, &acts.hidden[0], drop)?;
        let step = HookStep { acts, inputs, key: dropout };
        for l in 0..self.config.num_hidden_layers {
            self.layer_forward(rec, &step, l, hook)?;
        }
        hook.sequence_output(rec, &step)?;
        self.pooler_forward(rec, acts)
    }

    fn layer_forward(
        &self,
        rec: &mut Recorder,
        s: &HookStep,
        l: usize,
        hook: &dyn LayerHook,
    ) -> Result<(), GpuError> {
        let (p, acts, eps) = (&self.params.layers[l], s.acts, self.config.layer_norm_eps);
        let (x, rows) = (&acts.layers[l], acts.rows());
        let (h_in, h_out) = (&acts.hidden[l], &acts.hidden[l + 1]);
        p.attention.attend(rec, &self.attention_step(s, l), h_in, &x.attention)?;
        hook.attention_output(rec, s, l)?;
        p.attention.normalize(rec, eps, h_in, &x.attention, &x.a)?;
        p.ffn_in.forward_gelu(rec, rows, &x.a, &acts.ffn_a, &x.pre)?;
        let drop = self.hidden_dropout(s.key, site(l, Site::FfnOutput));
        p.ffn_out.forward_dropout(rec, rows, &acts.ffn_a, &x.ffn_drop, drop)?;
        hook.ffn_output(rec, s, l)?;
        let ln2 = p.ln2.layernorm(eps);
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
        let p = &self.params.pooler;
        let seq_out = &acts.hidden[self.config.num_hidden_layers];
        let op = Matmul { lda: Some(s * h), ..Matmul::new(b, h, h).trans_b() };
        matmul(rec, seq_out, &p.w, &acts.pooler, &op, Epilogue::Bias(&p.b))?;
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
        let op = "Bert::backward";
        self.check_bucket(op, acts, inputs)?;
        if !acts.training {
            return Err(shape_error(op, "the activations were made for inference".into()));
        }
        let (p, g) = (&self.params, self.grads()?);
        self.pooler_backward(rec, acts, d_seq, d_pooled)?;
        let step = HookStep { acts, inputs, key: dropout };
        hook.sequence_output_backward(rec, &step)?;
        for l in (0..self.config.num_hidden_layers).rev() {
            self.layer_backward(rec, &step, l, hook)?;
        }
        let d_ln =
            dropout_backward(rec, &acts.grad_x, &acts.sub, self.hidden_dropout(dropout, SITE_EMBEDDINGS))?;
        let ln = p.emb_ln.layernorm(self.config.layer_norm_eps);
        let ln_stats = stats(&acts.emb_mean, &acts.emb_rstd);
        let grads = g.emb_ln.grads(&acts.grad_y);
        #[rustfmt::skip]
        layernorm::layernorm_backward_with_scratch(
            rec, &ln, &acts.emb_sum, None, &ln_stats, d_ln, &grads, &acts.ln_scratch(),
        )?;
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
        let (p, g) = (&self.params.pooler, &self.grads()?.pooler);
        let seq_out = &acts.hidden[self.config.num_hidden_layers];
        elementwise::tanh_backward(rec, &acts.pooled, d_pooled, &acts.pooler)?;
        reduce::colsum_with_scratch(rec, &acts.pooler, &g.b, false, &acts.colsum)?;
        let dw = Matmul { ldb: Some(s * h), ..Matmul::new(h, h, b).trans_a() };
        matmul(rec, &acts.pooler, seq_out, &g.w, &dw, Epilogue::None)?;
        match d_seq {
            Some(d_seq) => copy(rec, d_seq, &acts.grad_x)?,
            None => embedding::zero_fill(rec, &acts.grad_x)?,
        }
        let dx = Matmul { ldc: Some(s * h), ..Matmul::new(b, h, h) };
        matmul(rec, &acts.pooler, &p.w, &acts.grad_x, &dx, Epilogue::Accumulate)
    }

    /// One layer's gradients from d(layer output) in grad_x; leaves d(layer input) there.
    fn layer_backward(
        &self,
        rec: &mut Recorder,
        s: &HookStep,
        l: usize,
        hook: &dyn LayerHook,
    ) -> Result<(), GpuError> {
        let (p, g) = (&self.params.layers[l], &self.grads()?.layers[l]);
        let (acts, eps) = (s.acts, self.config.layer_norm_eps);
        let (x, h_in, rows) = (&acts.layers[l], &acts.hidden[l], acts.rows());
        // out = LN2(ffn_drop + a): grad_y = d ffn_drop = d a through the residual.
        // ffn_drop came dropped from the matmul: d ffn_out = Dropout(grad_y) in the same pass.
        let (ln2, ln_stats) = (p.ln2.layernorm(eps), stats(&x.ln2_mean, &x.ln2_rstd));
        let (grads, scratch, saved) = (g.ln2.grads(&acts.grad_y), acts.ln_scratch(), (&x.ffn_drop, &x.a));
        let through = self.hidden_dropout(s.key, site(l, Site::FfnOutput)).map(|drop| (drop, &acts.sub));
        #[rustfmt::skip]
        layernorm::residual_layernorm_backward(
            rec, &ln2, saved, &ln_stats, &acts.grad_x, &grads, through, &scratch,
        )?;
        let d_ffn_out = if through.is_some() { &acts.sub } else { &acts.grad_y };
        hook.ffn_output_backward(rec, s, l)?;
        // The FFN: GELU(pre) is recomputed rather than kept; d pre ends in ffn_b, straight
        // from the product through GELU's backward (the matmul's epilogue).
        elementwise::gelu(rec, &x.pre, &acts.ffn_a)?;
        let to_ffn_b = Some((&acts.ffn_b, Epilogue::GeluBackward { pre: &x.pre }));
        let grads = (&g.ffn_out, GradMode::Overwrite);
        p.ffn_out.backward(rec, rows, &acts.ffn_a, d_ffn_out, grads, to_ffn_b, &acts.colsum)?;
        let to_a = Some((&acts.grad_y, Epilogue::Accumulate));
        p.ffn_in.backward(
            rec,
            rows,
            &x.a,
            &acts.ffn_b,
            (&g.ffn_in, GradMode::Overwrite),
            to_a,
            &acts.colsum,
        )?;
        hook.ffn_input_backward(rec, s, l)?;
        // a = LN1(attn_drop + h): grad_x = d attn_drop = d h through the residual.
        let (block, scratch) = (&p.attention, acts.attention_scratch());
        let saved = (h_in, &x.attention);
        let step = self.attention_step(s, l);
        // attn_drop came dropped from the output projection's matmul: unless the hook adds to
        // its gradient, that dropout's backward comes from LN1's backward pass.
        let adds = hook.adds_attention_output_grad();
        let through = step.out_drop.filter(|_| !adds).map(|drop| (drop, scratch.sub));
        #[rustfmt::skip]
        let d_out = block.normalize_backward(
            rec, eps, &g.attention, saved, &acts.grad_y, &acts.grad_x, &scratch.ln, through,
        )?;
        let hooked = hook.attention_output_backward(rec, s, l)?;
        let d_out = if adds { OutputGrad::Dropped(hooked) } else { d_out };
        block.attend_backward(rec, &step, &g.attention, saved, d_out, &acts.grad_x, &scratch)?;
        hook.input_backward(rec, s, l)
    }
}
