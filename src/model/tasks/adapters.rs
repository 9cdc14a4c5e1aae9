//! `adapters`: two Houlsby-style adapters per layer, one on each sublayer's output:
//! a = LN1(h + x + A1_l(x)),  out = LN2(a + Dropout_ffn(FFN(a)) + A2_l(a)),
//! A(x) = U·GELU(D·x + b_D) + b_U with D [s, H], U [H, s]; x = Dropout_ao(ctx·Woᵀ + bo).
//! Reference: reference/tasks/adapters.rs.

use super::TaskActivations;
use super::method::{
    Bucket, MethodBuffers, MethodName, TaskMethod, TaskTerms, acts_of, grads_of, linear_shapes,
};
use crate::gpu::ElementType::F32;
use crate::gpu::{GpuError, Recorder, Tensor};
use crate::kernels::elementwise;
use crate::model::BertConfig;
use crate::model::bert::ByName;
use crate::model::blocks::{
    Alloc, Bottleneck, BottleneckBuffers, BottleneckScratch, add_input_grad, copy, per_layer,
};
use crate::model::hook::{HookStep, LayerHook};

pub struct Adapters {
    pub size: usize,
}

/// Where each adapter sits, in parameter names and in [`AdapterLayerActs::pre`].
const SITES: [&str; 2] = ["attention", "ffn"];

/// One layer's adapter buffers: the pre-activations [rows, s] of the attention and FFN
/// adapters, and the attention adapter's input x [rows, H] (LN1's input is overwritten
/// with x + A1(x)).
#[derive(Clone)]
pub struct AdapterLayerActs<T> {
    pub pre: [T; 2],
    pub input: T,
}

pub struct AdapterActs<T> {
    pub layers: Vec<AdapterLayerActs<T>>,
    pub scratch: BottleneckBuffers<T>,
    /// [rows, s]: the FFN adapter's d pre, kept until d a is complete (backward only).
    pub d_pre_ffn: T,
    /// [rows, H]: d x of the attention adapter's input (backward only).
    pub d_x: T,
}

impl MethodBuffers for Adapters {
    type Acts<T> = AdapterActs<T>;

    fn build<T: Clone>(
        &self,
        c: &BertConfig,
        b: Bucket,
        alloc: Alloc<T>,
    ) -> Result<AdapterActs<T>, GpuError> {
        let (h, rows, brows, r) = (c.hidden_size, b.rows(), b.backward_rows(), self.size);
        let mut a = |name: &str, shape: &[usize]| alloc(format!("tasks.{name}"), shape, F32);
        let layers = per_layer(c.num_hidden_layers, b.training, |l| {
            Ok(AdapterLayerActs {
                pre: [
                    a(&format!("bottleneck.{l}.0.pre"), &[rows, r])?,
                    a(&format!("bottleneck.{l}.1.pre"), &[rows, r])?,
                ],
                input: a(&format!("adapter.{l}.input"), &[rows, h])?,
            })
        })?;
        Ok(AdapterActs {
            layers,
            scratch: BottleneckBuffers::build((rows, brows, r), &mut a)?,
            d_pre_ffn: a("scratch.bottleneck.d_pre_ffn", &[brows, r])?,
            d_x: a("scratch.bottleneck.d_x", &[brows, h])?,
        })
    }
}

impl TaskMethod for Adapters {
    fn name(&self) -> MethodName {
        MethodName::Adapters
    }

    fn check(&self) -> Result<(), String> {
        if self.size == 0 { Err("adapters needs a non-zero width".into()) } else { Ok(()) }
    }

    fn param_shapes(&self, c: &BertConfig, p: &str) -> Vec<(String, Vec<usize>)> {
        let (h, size) = (c.hidden_size, self.size);
        let mut shapes = Vec::new();
        for l in 0..c.num_hidden_layers {
            for site in SITES {
                shapes.extend(linear_shapes(format!("{p}adapter.layer.{l}.{site}.down"), size, h));
                shapes.extend(linear_shapes(format!("{p}adapter.layer.{l}.{site}.up"), h, size));
            }
        }
        shapes
    }

    fn terms(&self, c: &BertConfig, p: &str, params: &ByName, grads: Option<&ByName>) -> Box<dyn TaskTerms> {
        let of = |t: &ByName| {
            let adapter = |l: usize, site: &str| Bottleneck {
                down: t.linear(&format!("{p}adapter.layer.{l}.{site}.down")),
                up: t.linear(&format!("{p}adapter.layer.{l}.{site}.up")),
            };
            (0..c.num_hidden_layers).map(|l| SITES.map(|site| adapter(l, site))).collect()
        };
        Box::new(AdapterTerms { params: of(params), grads: grads.map(of) })
    }
}

/// One task's [attention, ffn] adapters per layer (or their gradients).
struct AdapterTerms {
    params: Vec<[Bottleneck; 2]>,
    grads: Option<Vec<[Bottleneck; 2]>>,
}

impl TaskTerms for AdapterTerms {
    fn hook<'a>(
        &'a self,
        _c: &'a BertConfig,
        acts: &'a TaskActivations,
    ) -> Result<Box<dyn LayerHook + 'a>, GpuError> {
        let own = acts_of::<AdapterActs<Tensor>>(acts, "adapters")?;
        Ok(Box::new(AdapterHook { terms: self, own, term: &acts.head.term }))
    }
}

struct AdapterHook<'a> {
    terms: &'a AdapterTerms,
    own: &'a AdapterActs<Tensor>,
    term: &'a Tensor,
}

impl AdapterHook<'_> {
    fn grads(&self, l: usize) -> Result<&[Bottleneck; 2], GpuError> {
        Ok(&grads_of(&self.terms.grads, "adapters")?[l])
    }
}

impl LayerHook for AdapterHook<'_> {
    /// x + A1(x) into LN1's input, keeping x.
    fn attention_output(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let (x, own) = (&s.acts.layers[l].attention.out, &self.own.layers[l]);
        copy(rec, x, &own.input)?;
        self.terms.params[l][0].forward(
            rec,
            s.acts.rows(),
            &own.input,
            (&own.pre[0], &self.own.scratch.g),
            self.term,
        )?;
        elementwise::add_assign(rec, self.term, x)
    }

    /// A2(a) into LN2's input.
    fn ffn_output(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let (x, own) = (&s.acts.layers[l], &self.own.layers[l]);
        self.terms.params[l][1].forward(
            rec,
            s.acts.rows(),
            &x.a,
            (&own.pre[1], &self.own.scratch.g),
            self.term,
        )?;
        elementwise::add_assign(rec, self.term, &x.ffn_drop)
    }

    /// A2's gradients from d(LN2's input) in grad_y; d pre waits in d_pre_ffn.
    fn ffn_output_backward(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        let (e, grads) = (s.acts, &self.grads(l)?[1]);
        let saved = (&e.layers[l].a, &self.own.layers[l].pre[1]);
        let scratch = BottleneckScratch { d_pre: &self.own.d_pre_ffn, ..self.own.scratch.scratch() };
        self.terms.params[l][1].backward(rec, e.rows(), grads, saved, &e.grad_y, &scratch, &e.colsum)
    }

    fn ffn_input_backward(&self, rec: &mut Recorder, s: &HookStep, l: usize) -> Result<(), GpuError> {
        add_input_grad(
            rec,
            s.acts.rows(),
            &self.terms.params[l][1].down.w,
            &self.own.d_pre_ffn,
            &s.acts.grad_y,
        )
    }

    fn adds_attention_output_grad(&self) -> bool {
        true
    }

    /// A1's gradients from d(LN1's input) in grad_x; returns d x = grad_x + A1's share.
    fn attention_output_backward<'a>(
        &'a self,
        rec: &mut Recorder,
        s: &HookStep<'a>,
        l: usize,
    ) -> Result<&'a Tensor, GpuError> {
        let (e, grads, own) = (s.acts, &self.grads(l)?[0], &self.own.layers[l]);
        let (adapter, scratch) = (&self.terms.params[l][0], self.own.scratch.scratch());
        adapter.backward(rec, e.rows(), grads, (&own.input, &own.pre[0]), &e.grad_x, &scratch, &e.colsum)?;
        copy(rec, &e.grad_x, &self.own.d_x)?;
        add_input_grad(rec, e.rows(), &adapter.down.w, scratch.d_pre, &self.own.d_x)?;
        Ok(&self.own.d_x)
    }
}
