//! `pals`: projected attention layers (the paper's method). Inside LN2 of every layer:
//! out = LN2(Dropout_ffn(FFN(a)) + a + TS(h)),  TS(h) = GELU(V^D·MHA_l(V^E·h + b_E) + b_D),
//! V^E [P, H], V^D [H, P] shared by all layers; per layer Q, K, V [P, P] with biases;
//! `heads` heads of P/heads, no output projection, the encoder's additive mask, and
//! dropout on the probabilities (attention_probs_dropout_prob, site(l, TaskSpecific)).
//! Reference: reference/tasks/pals.rs.

use super::TaskActivations;
use super::method::{
    Bucket, MethodBuffers, MethodName, TaskMethod, TaskTerms, acts_of, check_heads, grads_of, linear_shapes,
};
use crate::contract::{AttentionShape, DropoutSpec, Site, site};
use crate::gpu::ElementType::F32;
use crate::gpu::{GpuError, Recorder, Tensor};
use crate::kernels::attention;
use crate::kernels::elementwise;
use crate::kernels::matmul::Epilogue;
use crate::model::BertConfig;
use crate::model::bert::ByName;
use crate::model::blocks::{Alloc, GradMode, Linear, add_input_grad, per_layer};
use crate::model::hook::{HookStep, LayerHook};

pub struct Pals {
    pub dim: usize,
    pub heads: usize,
}

/// V^E, V^D and per layer [query, key, value] (or their gradients).
#[derive(Clone)]
pub struct PalParams {
    pub encoder: Linear,
    pub decoder: Linear,
    pub layers: Vec<[Linear; 3]>,
}

/// What one PAL layer's forward keeps for its backward (rows = B·S).
#[derive(Clone)]
pub struct PalLayerActs<T> {
    /// V^E·h + b_E [rows, P] = [B, S, heads, P/heads] once projected.
    pub enc: T,
    pub q: T,
    pub k: T,
    pub v: T,
    /// The attention output [rows, P] and its log-sum-exps [B, heads, S].
    pub ctx: T,
    pub lse: T,
    /// V^D·ctx + b_D [rows, H], the GELU's input.
    pub pre: T,
}

/// PALs' buffers; the scratch (backward only) is shared by all layers.
pub struct PalActs<T> {
    pub layers: Vec<PalLayerActs<T>>,
    /// [rows, H]: d pre.
    pub d_pre: T,
    /// [rows, P] each: d ctx, dq, dk, dv, and d enc (kept from the LN2 point to the
    /// layer input's point of the backward).
    pub d_ctx: T,
    pub dq: T,
    pub dk: T,
    pub dv: T,
    pub d_enc: T,
    /// [B, heads, S]
    pub delta: T,
}

impl MethodBuffers for Pals {
    type Acts<T> = PalActs<T>;

    fn build<T: Clone>(&self, c: &BertConfig, b: Bucket, alloc: Alloc<T>) -> Result<PalActs<T>, GpuError> {
        let (h, rows, brows, (p, heads)) =
            (c.hidden_size, b.rows(), b.backward_rows(), (self.dim, self.heads));
        let mut a = |name: &str, shape: &[usize]| alloc(format!("tasks.{name}"), shape, F32);
        let layers = per_layer(c.num_hidden_layers, b.training, |l| {
            let mut a = |name: &str, shape: &[usize]| a(&format!("pal.{l}.{name}"), shape);
            Ok(PalLayerActs {
                enc: a("enc", &[rows, p])?,
                q: a("q", &[rows, p])?,
                k: a("k", &[rows, p])?,
                v: a("v", &[rows, p])?,
                ctx: a("ctx", &[rows, p])?,
                lse: a("lse", &[b.batch, heads, b.seq])?,
                pre: a("pre", &[rows, h])?,
            })
        })?;
        let delta_batch = if b.training { b.batch } else { 0 };
        Ok(PalActs {
            layers,
            d_pre: a("scratch.pal.d_pre", &[brows, h])?,
            d_ctx: a("scratch.pal.d_ctx", &[brows, p])?,
            dq: a("scratch.pal.dq", &[brows, p])?,
            dk: a("scratch.pal.dk", &[brows, p])?,
            dv: a("scratch.pal.dv", &[brows, p])?,
            d_enc: a("scratch.pal.d_enc", &[brows, p])?,
            delta: a("scratch.pal.delta", &[delta_batch, heads, b.seq])?,
        })
    }
}

impl TaskMethod for Pals {
    fn name(&self) -> MethodName {
        MethodName::Pals
    }

    fn check(&self) -> Result<(), String> {
        check_heads("PAL", self.dim, self.heads)
    }

    fn param_shapes(&self, c: &BertConfig, p: &str) -> Vec<(String, Vec<usize>)> {
        let (h, dim) = (c.hidden_size, self.dim);
        let mut shapes = Vec::new();
        shapes.extend(linear_shapes(format!("{p}pal.encoder"), dim, h));
        shapes.extend(linear_shapes(format!("{p}pal.decoder"), h, dim));
        for l in 0..c.num_hidden_layers {
            for which in ["query", "key", "value"] {
                shapes.extend(linear_shapes(format!("{p}pal.layer.{l}.{which}"), dim, dim));
            }
        }
        shapes
    }

    fn terms(&self, c: &BertConfig, p: &str, params: &ByName, grads: Option<&ByName>) -> Box<dyn TaskTerms> {
        let of = |t: &ByName| PalParams {
            encoder: t.linear(&format!("{p}pal.encoder")),
            decoder: t.linear(&format!("{p}pal.decoder")),
            layers: (0..c.num_hidden_layers)
                .map(|l| ["query", "key", "value"].map(|w| t.linear(&format!("{p}pal.layer.{l}.{w}"))))
                .collect(),
        };
        Box::new(PalTerms { heads: self.heads, params: of(params), grads: grads.map(of) })
    }
}

/// One task's PALs.
struct PalTerms {
    heads: usize,
    params: PalParams,
    grads: Option<PalParams>,
}

impl TaskTerms for PalTerms {
    fn hook<'a>(
        &'a self,
        c: &'a BertConfig,
        acts: &'a TaskActivations,
    ) -> Result<Box<dyn LayerHook + 'a>, GpuError> {
        let pal = acts_of::<PalActs<Tensor>>(acts, "pals")?;
        Ok(Box::new(PalHook { c, terms: self, pal, term: &acts.head.term }))
    }
}

struct PalHook<'a> {
    c: &'a BertConfig,
    terms: &'a PalTerms,
    pal: &'a PalActs<Tensor>,
    /// Where TS(h) is written before it is added to LN2's input [rows, H].
    term: &'a Tensor,
}

impl PalHook<'_> {
    /// (attention shape, attention-probability dropout) of layer l.
    fn attention(&self, s: &HookStep, l: usize) -> (AttentionShape, DropoutSpec) {
        let (p, heads) = (self.terms.params.encoder.w.shape[0], self.terms.heads);
        let shape = AttentionShape { batch: s.acts.batch, seq: s.acts.seq, heads, head_dim: p / heads };
        let p = self.c.attention_probs_dropout_prob;
        (shape, DropoutSpec::at_or_none(s.key, p, site(l, Site::TaskSpecific)))
    }
}

impl LayerHook for PalHook<'_> {
    /// TS(h) added to LN2's input.
    fn ffn_output(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let (p, x, rows, h) = (&self.terms.params, &self.pal.layers[l], s.acts.rows(), &s.acts.hidden[l]);
        p.encoder.forward(rec, rows, h, &x.enc)?;
        for (w, out) in p.layers[l].iter().zip([&x.q, &x.k, &x.v]) {
            w.forward(rec, rows, &x.enc, out)?;
        }
        let ((shape, drop), mask) = (self.attention(s, l), &s.inputs.buffers.mask);
        let scale = shape.scale();
        attention::attention_forward(rec, shape, &x.q, &x.k, &x.v, mask, &x.ctx, &x.lse, scale, drop)?;
        p.decoder.forward_gelu(rec, rows, &x.ctx, self.term, &x.pre)?;
        elementwise::add_assign(rec, self.term, &s.acts.layers[l].ffn_drop)
    }

    /// PALs' gradients from dTS in grad_y; leaves d enc for `input_backward`. V^E and V^D
    /// serve every layer: the last layer (the backward's first) overwrites their gradients,
    /// the others add to them.
    fn ffn_output_backward(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let (p, g) = (&self.terms.params, grads_of(&self.terms.grads, "pals")?);
        let (t, x, e, rows) = (self.pal, &self.pal.layers[l], s.acts, s.acts.rows());
        let mode = if l + 1 == self.c.num_hidden_layers { GradMode::Overwrite } else { GradMode::Accumulate };
        elementwise::gelu_backward(rec, &x.pre, &e.grad_y, &t.d_pre)?;
        let to_ctx = Some((&t.d_ctx, Epilogue::None));
        p.decoder.backward(rec, rows, &x.ctx, &t.d_pre, (&g.decoder, mode), to_ctx, &e.colsum)?;
        let ((shape, drop), mask) = (self.attention(s, l), &s.inputs.buffers.mask);
        #[rustfmt::skip]
        attention::attention_backward(
            rec, shape, &x.q, &x.k, &x.v, &x.ctx, &t.d_ctx, mask, &x.lse, &t.delta, &t.dq, &t.dk, &t.dv,
            shape.scale(), drop,
        )?;
        for (i, ((w, gw), dy)) in p.layers[l].iter().zip(&g.layers[l]).zip([&t.dq, &t.dk, &t.dv]).enumerate()
        {
            let epilogue = if i == 0 { Epilogue::None } else { Epilogue::Accumulate };
            let to_enc = Some((&t.d_enc, epilogue));
            w.backward(rec, rows, &x.enc, dy, (gw, GradMode::Overwrite), to_enc, &e.colsum)?;
        }
        p.encoder.backward(rec, rows, &e.hidden[l], &t.d_enc, (&g.encoder, mode), None, &e.colsum)
    }

    fn input_backward(&self, rec: &mut Recorder, s: &HookStep, _l: usize) -> Result<(), GpuError> {
        add_input_grad(rec, s.acts.rows(), &self.terms.params.encoder.w, &self.pal.d_enc, &s.acts.grad_x)
    }
}
