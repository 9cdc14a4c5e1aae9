//! The BERT encoder and pooler on the CPU, forward and backward, composed from the reference
//! layers (embedding, layernorm, matmul, attention, elementwise). It follows the contract in
//! src/model/mod.rs. Activations stay in f64 between layers, so this is the exact function the
//! GPU's f32 pipeline approximates, and finite differences of it are accurate.

use super::embedding::Tables;
use super::{attention, elementwise, embedding, layernorm, matmul};
use crate::contract::{AttentionShape, DropoutSpec};
use crate::model::{
    BertConfig, DropoutKey, EncoderBatch, HostTensor, SITE_EMBEDDINGS, Site, Weights, param_shapes, site,
};
use std::collections::BTreeMap;

/// What the backward of one encoder layer needs; rows are the B·S tokens.
pub struct LayerCache {
    /// The layer's input h [B·S, H].
    pub input: Vec<f64>,
    /// q, k, v [B·S, H] = [B, S, heads, d].
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    /// Attention output before the output projection [B·S, H].
    pub ctx: Vec<f64>,
    /// Dropout_ao(ctx·Woᵀ + bo) [B·S, H]: what a hook's attention term reads.
    pub attn_out: Vec<f64>,
    /// LN1's input: attn_out + h (+ the hook's attention term) [B·S, H].
    pub s1: Vec<f64>,
    /// LN1's output a [B·S, H].
    pub a: Vec<f64>,
    /// a·W1ᵀ + b1 and its GELU [B·S, I].
    pub ff_pre: Vec<f64>,
    pub ff_act: Vec<f64>,
    /// LN2's input: Dropout_ffn(ff_act·W2ᵀ + b2) + a (+ the hook's FFN term) [B·S, H].
    pub s2: Vec<f64>,
}

/// Every activation the backward needs, and the outputs in f64.
pub struct BertCache {
    /// The dropout masks the forward drew (the backward reuses them).
    pub dropout: Option<DropoutKey>,
    /// word + position + type embeddings, LN_emb's input [B·S, H].
    pub emb_sum: Vec<f64>,
    pub layers: Vec<LayerCache>,
    /// The last layer's output [B·S, H].
    pub encoder_output: Vec<f64>,
    /// The sequence output [B·S, H]: the last layer's, or what the hook replaced it with.
    pub sequence: Vec<f64>,
    /// Row 0 of each sequence [B, H] and tanh(cls·Wpᵀ + bp) [B, H].
    pub cls: Vec<f64>,
    pub pooled: Vec<f64>,
}

/// Sizes of one pass.
struct Dims {
    rows: usize,
    hidden: usize,
    inter: usize,
    attn: AttentionShape,
}

impl Dims {
    fn new(c: &BertConfig, batch: &EncoderBatch) -> Dims {
        let rows = batch.batch * batch.seq;
        assert_eq!(batch.ids.len(), rows, "ids");
        assert_eq!(batch.type_ids.len(), rows, "type_ids");
        assert_eq!(batch.mask.len(), rows, "mask");
        assert!(batch.seq <= c.max_position_embeddings, "sequence longer than the position table");
        assert_eq!(c.hidden_size % c.num_attention_heads, 0, "hidden size not divisible by heads");
        let attn = AttentionShape {
            batch: batch.batch,
            seq: batch.seq,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        };
        Dims { rows, hidden: c.hidden_size, inter: c.intermediate_size, attn }
    }
}

/// The dropout of one pass: which masks (none without a key) and their probabilities.
struct Dropout {
    key: Option<DropoutKey>,
    hidden_p: f32,
    attention_p: f32,
}

impl Dropout {
    fn new(c: &BertConfig, key: Option<DropoutKey>) -> Dropout {
        Dropout {
            key,
            hidden_p: c.hidden_dropout_prob as f32,
            attention_p: c.attention_probs_dropout_prob as f32,
        }
    }

    fn spec(&self, site: u32, p: f32) -> DropoutSpec {
        DropoutSpec::at_or_none(self.key, p as f64, site)
    }

    /// Hidden dropout at `site`; applied to a gradient it is its own backward.
    fn hidden(&self, x: &[f64], site: u32) -> Vec<f64> {
        elementwise::dropout_f64(x, &self.spec(site, self.hidden_p))
    }

    fn attention(&self, layer: usize) -> DropoutSpec {
        self.spec(site(layer, Site::AttentionProbs), self.attention_p)
    }
}

fn param<'a>(weights: &'a Weights, name: &str) -> &'a [f32] {
    &weights.get(name).unwrap_or_else(|| panic!("missing parameter {name}")).data
}

fn param_f64(weights: &Weights, name: &str) -> Vec<f64> {
    param(weights, name).iter().map(|&v| v as f64).collect()
}

fn add(x: &[f64], y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(a, b)| a + b).collect()
}

/// x + y, or x alone when there is no y.
fn add_some(x: Vec<f64>, y: Option<Vec<f64>>) -> Vec<f64> {
    match y {
        Some(y) => add(&x, &y),
        None => x,
    }
}

/// What a hook sees of the pass: the layer, the batch's shape and mask, the dropout key.
pub struct HookContext<'a> {
    pub layer: usize,
    pub batch: usize,
    pub seq: usize,
    /// The additive mask (1 − mask)·(−10000) [B, S].
    pub mask: &'a [f64],
    pub dropout: Option<DropoutKey>,
}

impl HookContext<'_> {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// Terms a method adds inside every encoder layer (reference::tasks implements them), as
/// the GPU's `model::bert::LayerHook`; `None` is no term. In layer l, with x =
/// Dropout_ao(ctx·Woᵀ + bo):
///
/// ```text
/// a   = LN1(x + h + attention_term(x))
/// out = LN2(Dropout_ffn(FFN(a)) + a + ffn_term(h, a))
/// ```
///
/// After the last layer, `sequence_output` may replace the sequence output (top projected
/// attention); its context has `layer` = L, the number of layers.
///
/// The backward of each term gets its output's gradient, stores its parameters'
/// gradients in `g` (adding to what is there for a parameter shared by several layers) and
/// returns its inputs' gradients. A hook recomputes its intermediates from the inputs.
pub trait LayerHook {
    fn attention_term(&self, _ctx: &HookContext, _x: &[f64]) -> Option<Vec<f64>> {
        None
    }

    fn ffn_term(&self, _ctx: &HookContext, _h: &[f64], _a: &[f64]) -> Option<Vec<f64>> {
        None
    }

    /// d x, or None when the term does not depend on x.
    fn attention_term_backward(
        &self,
        _ctx: &HookContext,
        _x: &[f64],
        _d_term: &[f64],
        _g: &mut Grads,
    ) -> Option<Vec<f64>> {
        None
    }

    /// (d h, d a), each None when the term does not depend on it.
    fn ffn_term_backward(
        &self,
        _ctx: &HookContext,
        _h: &[f64],
        _a: &[f64],
        _d_term: &[f64],
        _g: &mut Grads,
    ) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
        (None, None)
    }

    /// What replaces the last layer's output `h` as the sequence output, or None to keep it.
    fn sequence_output(&self, _ctx: &HookContext, _h: &[f64]) -> Option<Vec<f64>> {
        None
    }

    /// d h from d(sequence output), when `sequence_output` replaced it.
    fn sequence_output_backward(
        &self,
        _ctx: &HookContext,
        _h: &[f64],
        _d_sequence: &[f64],
        _g: &mut Grads,
    ) -> Option<Vec<f64>> {
        None
    }
}

/// The plain encoder: no terms.
pub struct NoHook;

impl LayerHook for NoHook {}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// The parameters of encoder layer l, in f64.
struct LayerParams {
    wq: Vec<f64>,
    bq: Vec<f64>,
    wk: Vec<f64>,
    bk: Vec<f64>,
    wv: Vec<f64>,
    bv: Vec<f64>,
    wo: Vec<f64>,
    bo: Vec<f64>,
    ln1_g: Vec<f64>,
    ln1_b: Vec<f64>,
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: Vec<f64>,
    ln2_g: Vec<f64>,
    ln2_b: Vec<f64>,
}

fn layer_prefix(l: usize) -> String {
    format!("encoder.layer.{l}.")
}

impl LayerParams {
    fn load(weights: &Weights, l: usize) -> LayerParams {
        let get = |name: &str| param_f64(weights, &format!("{}{name}", layer_prefix(l)));
        LayerParams {
            wq: get("attention.self.query.weight"),
            bq: get("attention.self.query.bias"),
            wk: get("attention.self.key.weight"),
            bk: get("attention.self.key.bias"),
            wv: get("attention.self.value.weight"),
            bv: get("attention.self.value.bias"),
            wo: get("attention.output.dense.weight"),
            bo: get("attention.output.dense.bias"),
            ln1_g: get("attention.output.LayerNorm.weight"),
            ln1_b: get("attention.output.LayerNorm.bias"),
            w1: get("intermediate.dense.weight"),
            b1: get("intermediate.dense.bias"),
            w2: get("output.dense.weight"),
            b2: get("output.dense.bias"),
            ln2_g: get("output.LayerNorm.weight"),
            ln2_b: get("output.LayerNorm.bias"),
        }
    }
}

/// Gradients by parameter name, in f64.
pub type Grads = BTreeMap<String, Vec<f64>>;

// ----------------------------------------------------------------------------------------
// Forward

/// (emb_sum, h0): h0 = Dropout_0(LN_emb(word[id] + pos[s] + type[tt])).
fn embeddings_forward(
    c: &BertConfig,
    w: &Weights,
    batch: &EncoderBatch,
    drop: &Dropout,
) -> (Vec<f64>, Vec<f64>) {
    let tables = Tables {
        word: param(w, "embeddings.word_embeddings.weight"),
        pos: param(w, "embeddings.position_embeddings.weight"),
        types: param(w, "embeddings.token_type_embeddings.weight"),
        hidden: c.hidden_size,
    };
    let emb_sum = embedding::forward_f64(&batch.ids, &batch.type_ids, batch.seq, &tables);
    let gamma = param_f64(w, "embeddings.LayerNorm.weight");
    let beta = param_f64(w, "embeddings.LayerNorm.bias");
    let (y, _, _) = layernorm::forward_f64(&emb_sum, &gamma, &beta, c.layer_norm_eps);
    let h0 = drop.hidden(&y, SITE_EMBEDDINGS);
    (emb_sum, h0)
}

/// One encoder layer: (cache, out).
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    c: &BertConfig,
    p: &LayerParams,
    x: &[f64],
    ctx: &HookContext,
    d: &Dims,
    drop: &Dropout,
    hook: &dyn LayerHook,
) -> (LayerCache, Vec<f64>) {
    let (l, mask) = (ctx.layer, ctx.mask);
    let (rows, h, i) = (d.rows, d.hidden, d.inter);
    let linear = matmul::linear_forward_f64;
    let q = linear(x, &p.wq, Some(&p.bq), rows, h, h);
    let k = linear(x, &p.wk, Some(&p.bk), rows, h, h);
    let v = linear(x, &p.wv, Some(&p.bv), rows, h, h);
    let scale = 1.0 / (d.attn.head_dim as f64).sqrt();
    let (attn, _) = attention::forward_f64(&d.attn, &q, &k, &v, mask, scale, &drop.attention(l));
    let proj = linear(&attn, &p.wo, Some(&p.bo), rows, h, h);
    let attn_out = drop.hidden(&proj, site(l, Site::AttentionOutput));
    let s1 = add_some(add(&attn_out, x), hook.attention_term(ctx, &attn_out));
    let (a, _, _) = layernorm::forward_f64(&s1, &p.ln1_g, &p.ln1_b, c.layer_norm_eps);
    let ff_pre = linear(&a, &p.w1, Some(&p.b1), rows, i, h);
    let ff_act: Vec<f64> = ff_pre.iter().map(|&z| elementwise::gelu(z)).collect();
    let ff_out = linear(&ff_act, &p.w2, Some(&p.b2), rows, h, i);
    let s2 = add(&drop.hidden(&ff_out, site(l, Site::FfnOutput)), &a);
    let s2 = add_some(s2, hook.ffn_term(ctx, x, &a));
    let (out, _, _) = layernorm::forward_f64(&s2, &p.ln2_g, &p.ln2_b, c.layer_norm_eps);
    let cache = LayerCache { input: x.to_vec(), q, k, v, ctx: attn, attn_out, s1, a, ff_pre, ff_act, s2 };
    (cache, out)
}

/// (cls [B, H], pooled [B, H]): pooled = tanh(seq[:, 0, :]·Wpᵀ + bp).
fn pooler_forward(
    w: &Weights,
    sequence: &[f64],
    batch: &EncoderBatch,
    hidden: usize,
) -> (Vec<f64>, Vec<f64>) {
    let cls: Vec<f64> =
        (0..batch.batch).flat_map(|b| &sequence[b * batch.seq * hidden..][..hidden]).copied().collect();
    let wp = param_f64(w, "pooler.dense.weight");
    let bp = param_f64(w, "pooler.dense.bias");
    let z = matmul::linear_forward_f64(&cls, &wp, Some(&bp), batch.batch, hidden, hidden);
    let pooled = z.iter().map(|v| v.tanh()).collect();
    (cls, pooled)
}

/// Returns (cache, sequence_output [B*S*H], pooled [B*H]).
pub fn forward(
    config: &BertConfig,
    weights: &Weights,
    batch: &EncoderBatch,
    dropout: Option<DropoutKey>,
) -> (BertCache, Vec<f32>, Vec<f32>) {
    forward_with(config, weights, batch, dropout, &NoHook)
}

/// `forward` with the terms of `hook` inside every layer.
pub fn forward_with(
    config: &BertConfig,
    weights: &Weights,
    batch: &EncoderBatch,
    dropout: Option<DropoutKey>,
    hook: &dyn LayerHook,
) -> (BertCache, Vec<f32>, Vec<f32>) {
    let d = Dims::new(config, batch);
    let drop = Dropout::new(config, dropout);
    let mask: Vec<f64> = batch.additive_mask().iter().map(|&m| m as f64).collect();
    let (emb_sum, mut h) = embeddings_forward(config, weights, batch, &drop);
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    let context = |layer| HookContext { layer, batch: batch.batch, seq: batch.seq, mask: &mask, dropout };
    for l in 0..config.num_hidden_layers {
        let ctx = context(l);
        let (cache, out) = layer_forward(config, &LayerParams::load(weights, l), &h, &ctx, &d, &drop, hook);
        layers.push(cache);
        h = out;
    }
    let sequence = hook.sequence_output(&context(config.num_hidden_layers), &h).unwrap_or_else(|| h.clone());
    let (cls, pooled) = pooler_forward(weights, &sequence, batch, d.hidden);
    let narrow = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (sequence_out, pooled_out) = (narrow(&sequence), narrow(&pooled));
    let cache = BertCache { dropout, emb_sum, layers, encoder_output: h, sequence, cls, pooled };
    (cache, sequence_out, pooled_out)
}

// ----------------------------------------------------------------------------------------
// Backward

/// Accumulates the embedding and LN_emb gradients from d_h0.
fn embeddings_backward(
    c: &BertConfig,
    w: &Weights,
    batch: &EncoderBatch,
    cache: &BertCache,
    drop: &Dropout,
    d_h0: &[f64],
    g: &mut Grads,
) {
    let d_y = drop.hidden(d_h0, SITE_EMBEDDINGS);
    let gamma = param_f64(w, "embeddings.LayerNorm.weight");
    let (d_sum, d_gamma, d_beta) = layernorm::backward_f64(&cache.emb_sum, &gamma, &d_y, c.layer_norm_eps);
    g.insert("embeddings.LayerNorm.weight".into(), d_gamma);
    g.insert("embeddings.LayerNorm.bias".into(), d_beta);
    let rows = [c.vocab_size, c.max_position_embeddings, c.type_vocab_size];
    let (d_word, d_pos, d_type) =
        embedding::backward_f64(&d_sum, &batch.ids, &batch.type_ids, batch.seq, c.hidden_size, rows);
    g.insert("embeddings.word_embeddings.weight".into(), d_word);
    g.insert("embeddings.position_embeddings.weight".into(), d_pos);
    g.insert("embeddings.token_type_embeddings.weight".into(), d_type);
}

/// One encoder layer's backward: stores its parameter gradients, returns d_input.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    c: &BertConfig,
    p: &LayerParams,
    cache: &LayerCache,
    ctx: &HookContext,
    d: &Dims,
    drop: &Dropout,
    hook: &dyn LayerHook,
    d_out: &[f64],
    g: &mut Grads,
) -> Vec<f64> {
    let (rows, h, i) = (d.rows, d.hidden, d.inter);
    let (l, mask) = (ctx.layer, ctx.mask);
    let eps = c.layer_norm_eps;
    let linear = matmul::linear_backward_f64;
    let put =
        |g: &mut Grads, name: &str, grad: Vec<f64>| g.insert(format!("{}{name}", layer_prefix(l)), grad);

    // out = LN2(s2), s2 = Dropout_ffn(ff_out) + a.
    let (d_s2, d_ln2_g, d_ln2_b) = layernorm::backward_f64(&cache.s2, &p.ln2_g, d_out, eps);
    let (d_x_hook, d_a_hook) = hook.ffn_term_backward(ctx, &cache.input, &cache.a, &d_s2, g);
    put(g, "output.LayerNorm.weight", d_ln2_g);
    put(g, "output.LayerNorm.bias", d_ln2_b);
    let d_ff_out = drop.hidden(&d_s2, site(l, Site::FfnOutput));
    let (d_ff_act, d_w2, d_b2) = linear(&cache.ff_act, &p.w2, &d_ff_out, rows, h, i);
    put(g, "output.dense.weight", d_w2);
    put(g, "output.dense.bias", d_b2);
    let d_ff_pre: Vec<f64> =
        d_ff_act.iter().zip(&cache.ff_pre).map(|(dy, &z)| dy * elementwise::gelu_grad(z)).collect();
    let (d_a_ffn, d_w1, d_b1) = linear(&cache.a, &p.w1, &d_ff_pre, rows, i, h);
    put(g, "intermediate.dense.weight", d_w1);
    put(g, "intermediate.dense.bias", d_b1);
    let d_a = add_some(add(&d_s2, &d_a_ffn), d_a_hook);

    // a = LN1(s1), s1 = Dropout_ao(ctx·Woᵀ + bo) + h.
    let (d_s1, d_ln1_g, d_ln1_b) = layernorm::backward_f64(&cache.s1, &p.ln1_g, &d_a, eps);
    put(g, "attention.output.LayerNorm.weight", d_ln1_g);
    put(g, "attention.output.LayerNorm.bias", d_ln1_b);
    let d_attn_out = add_some(d_s1.clone(), hook.attention_term_backward(ctx, &cache.attn_out, &d_s1, g));
    let d_proj = drop.hidden(&d_attn_out, site(l, Site::AttentionOutput));
    let (d_ctx, d_wo, d_bo) = linear(&cache.ctx, &p.wo, &d_proj, rows, h, h);
    put(g, "attention.output.dense.weight", d_wo);
    put(g, "attention.output.dense.bias", d_bo);
    let scale = 1.0 / (d.attn.head_dim as f64).sqrt();
    let (d_q, d_k, d_v) = attention::backward_f64(
        &d.attn,
        &cache.q,
        &cache.k,
        &cache.v,
        mask,
        &d_ctx,
        scale,
        &drop.attention(l),
    );
    let mut d_x = add_some(d_s1, d_x_hook);
    for (which, d_y, w) in [("query", d_q, &p.wq), ("key", d_k, &p.wk), ("value", d_v, &p.wv)] {
        let (d_x_part, d_w, d_b) = linear(&cache.input, w, &d_y, rows, h, h);
        put(g, &format!("attention.self.{which}.weight"), d_w);
        put(g, &format!("attention.self.{which}.bias"), d_b);
        d_x = add(&d_x, &d_x_part);
    }
    d_x
}

/// The pooler's backward: stores dWp, dbp; returns d_cls [B, H].
fn pooler_backward(
    w: &Weights,
    cache: &BertCache,
    batch: usize,
    hidden: usize,
    d_pooled: &[f64],
    g: &mut Grads,
) -> Vec<f64> {
    let d_z: Vec<f64> =
        d_pooled.iter().zip(&cache.pooled).map(|(dy, &t)| dy * elementwise::tanh_grad(t)).collect();
    let wp = param_f64(w, "pooler.dense.weight");
    let (d_cls, d_wp, d_bp) = matmul::linear_backward_f64(&cache.cls, &wp, &d_z, batch, hidden, hidden);
    g.insert("pooler.dense.weight".into(), d_wp);
    g.insert("pooler.dense.bias".into(), d_bp);
    d_cls
}

/// Gradients of Σ(d_seq ⊙ sequence_output) + Σ(d_pooled ⊙ pooled) w.r.t. every parameter, keyed by the same names as `weights`.
pub fn backward(
    config: &BertConfig,
    weights: &Weights,
    batch: &EncoderBatch,
    cache: &BertCache,
    d_seq: &[f32],
    d_pooled: &[f32],
) -> Weights {
    let widen = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (grads, rest) =
        backward_with(config, weights, batch, cache, &widen(d_seq), &widen(d_pooled), &NoHook);
    assert!(rest.is_empty(), "gradients without a parameter: {:?}", rest.keys());
    grads
}

/// `backward` after `forward_with` the same `hook`, from f64 output gradients: the encoder's
/// gradients by name, and what the hook stored (its parameters' gradients, in f64).
pub fn backward_with(
    config: &BertConfig,
    weights: &Weights,
    batch: &EncoderBatch,
    cache: &BertCache,
    d_seq: &[f64],
    d_pooled: &[f64],
    hook: &dyn LayerHook,
) -> (Weights, Grads) {
    let d = Dims::new(config, batch);
    assert_eq!(d_seq.len(), d.rows * d.hidden, "d_seq");
    assert_eq!(d_pooled.len(), batch.batch * d.hidden, "d_pooled");
    let drop = Dropout::new(config, cache.dropout);
    let mask: Vec<f64> = batch.additive_mask().iter().map(|&m| m as f64).collect();
    let mut g = Grads::new();

    let d_cls = pooler_backward(weights, cache, batch.batch, d.hidden, d_pooled, &mut g);
    let mut d_h = d_seq.to_vec();
    for (b, d_row) in d_cls.chunks_exact(d.hidden).enumerate() {
        let row = &mut d_h[b * batch.seq * d.hidden..][..d.hidden];
        row.iter_mut().zip(d_row).for_each(|(x, y)| *x += y);
    }
    let context = |layer| HookContext {
        layer,
        batch: batch.batch,
        seq: batch.seq,
        mask: &mask,
        dropout: cache.dropout,
    };
    let top = context(config.num_hidden_layers);
    if let Some(d_last) = hook.sequence_output_backward(&top, &cache.encoder_output, &d_h, &mut g) {
        d_h = d_last;
    }
    for l in (0..config.num_hidden_layers).rev() {
        let p = LayerParams::load(weights, l);
        d_h = layer_backward(config, &p, &cache.layers[l], &context(l), &d, &drop, hook, &d_h, &mut g);
    }
    embeddings_backward(config, weights, batch, cache, &drop, &d_h, &mut g);

    let grads = param_shapes(config)
        .into_iter()
        .map(|(name, shape)| {
            let grad = g.remove(&name).unwrap_or_else(|| panic!("no gradient for {name}"));
            (name, HostTensor::new(&shape, grad.iter().map(|&v| v as f32).collect()))
        })
        .collect();
    (grads, g)
}

/// Σ(d_seq ⊙ sequence) + Σ(d_pooled ⊙ pooled) from a forward's f64 outputs: the scalar
/// whose gradient `backward` returns.
pub fn loss_of(cache: &BertCache, d_seq: &[f32], d_pooled: &[f32]) -> f64 {
    let widen = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    dot(&cache.sequence, &widen(d_seq)) + dot(&cache.pooled, &widen(d_pooled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dropout_stream;
    use crate::reference::{random_vec, rng};

    fn config() -> BertConfig {
        BertConfig {
            vocab_size: 20,
            max_position_embeddings: 16,
            hidden_dropout_prob: 0.2,
            attention_probs_dropout_prob: 0.25,
            ..BertConfig::tiny(2, 8, 2)
        }
    }

    /// Random weights large enough that every nonlinearity matters, with non-trivial
    /// biases and LayerNorm parameters.
    fn test_weights(c: &BertConfig) -> Weights {
        param_shapes(c)
            .into_iter()
            .enumerate()
            .map(|(index, (name, shape))| {
                let len = shape.iter().product();
                let r = random_vec(len, 100 + index as u32, 1.0);
                let data = if name.contains("LayerNorm.weight") {
                    r.iter().map(|v| 1.0 + 0.3 * v).collect()
                } else if name.contains("embeddings.") {
                    r
                } else {
                    r.iter().map(|v| 0.5 * v).collect()
                };
                (name, HostTensor::new(&shape, data))
            })
            .collect()
    }

    /// B = 2 sequences of length `seq`; the second has only seq/2 + 1 real tokens.
    fn test_batch(c: &BertConfig, seq: usize) -> EncoderBatch {
        let rows = 2 * seq;
        // Word row 0 stays unused so that its gradient must be zero.
        let ids = (0..rows as u32).map(|i| 1 + rng::rng_u32(3, 1, i) % (c.vocab_size as u32 - 1)).collect();
        let type_ids = (0..rows).map(|r| ((r % seq) >= seq / 2) as u32).collect();
        let real = seq / 2 + 1;
        let mask = (0..rows).map(|r| if r < seq || r % seq < real { 1.0 } else { 0.0 }).collect();
        EncoderBatch { batch: 2, seq, ids, type_ids, mask }
    }

    /// Three entries of a parameter tensor whose gradient the batch reaches.
    fn sample(name: &str, len: usize, c: &BertConfig, batch: &EncoderBatch) -> Vec<usize> {
        (0..3u32)
            .map(|t| {
                let r = rng::rng_u32(11, name.len() as u32, t) as usize;
                let col = r % c.hidden_size;
                if name.contains("word_embeddings") {
                    batch.ids[r % batch.ids.len()] as usize * c.hidden_size + col
                } else if name.contains("position_embeddings") {
                    (r % batch.seq) * c.hidden_size + col
                } else {
                    r % len
                }
            })
            .collect()
    }

    /// Analytic gradients against central differences of the f64 loss, for sampled entries
    /// of every parameter. The forward is f64 throughout, so with h = 2.5e-4 the truncation
    /// error is ~2e-7 relative (it scales as h²) and rounding ~1e-10: the tolerance is
    /// |fd − analytic| ≤ 1e-6·max(1, |analytic|).
    fn check_gradients(seq: usize, dropout: Option<DropoutKey>) {
        let c = config();
        let weights = test_weights(&c);
        let batch = test_batch(&c, seq);
        let d_seq = random_vec(2 * seq * c.hidden_size, 21, 1.0);
        let d_pooled = random_vec(2 * c.hidden_size, 22, 1.0);
        let (cache, _, _) = forward(&c, &weights, &batch, dropout);
        let grads = backward(&c, &weights, &batch, &cache, &d_seq, &d_pooled);
        assert_eq!(grads.keys().collect::<Vec<_>>(), weights.keys().collect::<Vec<_>>());
        let loss = |w: &Weights| loss_of(&forward(&c, w, &batch, dropout).0, &d_seq, &d_pooled);
        let h = 2.5e-4f32;
        for (name, tensor) in &weights {
            assert_eq!(grads[name].shape, tensor.shape, "{name}");
            for i in sample(name, tensor.data.len(), &c, &batch) {
                let (mut plus, mut minus) = (weights.clone(), weights.clone());
                plus.get_mut(name).unwrap().data[i] += h;
                minus.get_mut(name).unwrap().data[i] -= h;
                // The f32 steps are not exactly ±h; divide by the step actually taken.
                let step = plus[name].data[i] as f64 - minus[name].data[i] as f64;
                let fd = (loss(&plus) - loss(&minus)) / step;
                let analytic = grads[name].data[i] as f64;
                let err = (fd - analytic).abs() / analytic.abs().max(1.0);
                assert!(err < 1e-6, "{name}[{i}] (S={seq}, {dropout:?}): fd {fd} analytic {analytic}");
            }
        }
        let unused_word_row = &grads["embeddings.word_embeddings.weight"].data[..c.hidden_size];
        assert!(unused_word_row.iter().all(|&v| v == 0.0), "word row 0 is never looked up");
    }

    /// Whether a key drops something at the hidden and attention sites of layer 0.
    fn drops_something(c: &BertConfig, key: DropoutKey, seq: usize) -> bool {
        let n = (2 * seq * c.hidden_size) as u32;
        let stream = |which| dropout_stream(key.step, site(0, which));
        let dropped = |stream, n, p: f64| (0..n).any(|i| !rng::keep(key.seed, stream, i, p as f32));
        let probs = (2 * c.num_attention_heads * seq * seq) as u32;
        dropped(stream(Site::AttentionOutput), n, c.hidden_dropout_prob)
            && dropped(stream(Site::AttentionProbs), probs, c.attention_probs_dropout_prob)
    }

    const KEY: DropoutKey = DropoutKey::new(1234, 3);

    #[test]
    fn gradients_match_finite_differences_without_dropout() {
        for seq in [5, 7] {
            check_gradients(seq, None);
        }
    }

    #[test]
    fn gradients_match_finite_differences_with_dropout() {
        for seq in [5, 7] {
            assert!(drops_something(&config(), KEY, seq));
            check_gradients(seq, Some(KEY));
        }
    }

    #[test]
    fn dropout_key_matters_only_with_dropout() {
        let c = config();
        let weights = test_weights(&c);
        let batch = test_batch(&c, 7);
        let run = |c: &BertConfig, key| {
            let (_, seq, pooled) = forward(c, &weights, &batch, key);
            (seq, pooled)
        };
        let other = DropoutKey::new(99, 4);
        let no_dropout = run(&c, None);
        assert_ne!(run(&c, Some(KEY)), no_dropout);
        assert_ne!(run(&c, Some(KEY)), run(&c, Some(other)));
        assert_eq!(run(&c, Some(KEY)), run(&c, Some(KEY)));
        // With zero probabilities a key draws masks that keep everything.
        let c0 = BertConfig { hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0, ..c.clone() };
        assert_eq!(run(&c0, Some(KEY)), no_dropout);
        assert_eq!(run(&c0, Some(other)), no_dropout);
        assert_eq!(run(&c0, None), no_dropout);
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let c = config();
        let weights = test_weights(&c);
        let seq = 7;
        let batch = test_batch(&c, seq);
        let padded: Vec<usize> = (0..batch.mask.len()).filter(|&r| batch.mask[r] == 0.0).collect();
        assert!(!padded.is_empty());
        let mut changed = batch.clone();
        for &r in &padded {
            changed.ids[r] = (changed.ids[r] + 5) % c.vocab_size as u32;
            changed.type_ids[r] ^= 1;
        }
        for key in [None, Some(KEY)] {
            let (_, seq_a, pooled_a) = forward(&c, &weights, &batch, key);
            let (_, seq_b, pooled_b) = forward(&c, &weights, &changed, key);
            assert_eq!(pooled_a, pooled_b, "{key:?}");
            for r in (0..batch.mask.len()).filter(|r| !padded.contains(r)) {
                let row = r * c.hidden_size..(r + 1) * c.hidden_size;
                assert_eq!(seq_a[row.clone()], seq_b[row], "row {r} ({key:?})");
            }
            let first_padded = padded[0] * c.hidden_size..(padded[0] + 1) * c.hidden_size;
            assert_ne!(seq_a[first_padded.clone()], seq_b[first_padded], "padded rows do change");
        }
    }
}
