//! Layer blocks above single kernels, each with its backward beside its forward: a
//! [`Linear`], a [`Bottleneck`] (low-rank layers and adapters), the attention sublayer
//! ([`AttentionBlock`]: QKV, attention, output dense, dropout, residual LayerNorm) and the
//! buffer allocation every builder goes through. The encoder (bert.rs) and every task
//! method (tasks/) are written with these.

use crate::contract::{AttentionShape, DropoutSpec};
use crate::gpu::{ElementType, Gpu, GpuError, Recorder, Tensor};
use crate::kernels::attention;
use crate::kernels::elementwise;
use crate::kernels::layernorm::{self, LayerNorm, LayerNormGrads, LayerNormScratch, LayerNormStats};
use crate::kernels::matmul::{Epilogue, Matmul, matmul};
use crate::kernels::reduce;

pub(crate) fn shape_error(op: &str, detail: String) -> GpuError {
    GpuError::Shape { op: op.into(), detail }
}

// ----------------------------------------------------------------------------------------
// Allocation

/// What a builder calls for every buffer it needs: (name, shape) to a tensor, or to
/// nothing when only the list is wanted (the memory report).
/// (name, shape, element type) → a buffer.
pub type Alloc<'a, T> = &'a mut dyn FnMut(String, &[usize], ElementType) -> Result<T, GpuError>;

/// An allocator of buffers by a name within its caller's namespace.
pub type NamedAlloc<'a, T> = &'a mut dyn FnMut(&str, &[usize]) -> Result<T, GpuError>;

/// `NamedAlloc` with the buffer's element type.
pub type TypedAlloc<'a, T> = &'a mut dyn FnMut(&str, &[usize], ElementType) -> Result<T, GpuError>;

/// One buffer a `build` asks for: (name, shape, element type).
pub type Planned = (String, Vec<usize>, ElementType);

/// The (name, shape) list of what `build` allocates, without a GPU.
pub(crate) fn plan_of<S>(build: impl FnOnce(Alloc<()>) -> Result<S, GpuError>) -> Vec<Planned> {
    let mut list = Vec::new();
    build(&mut |name, shape, dtype| {
        list.push((name, shape.to_vec(), dtype));
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
    let built = build(&mut |name, shape, dtype| {
        let tensor = gpu.zeros_of(&name, shape, dtype)?;
        all.push(tensor.clone());
        Ok(tensor)
    })?;
    Ok((built, all))
}

/// `count` per-layer buffer sets from `make(l)`. Training keeps every layer's (the
/// backward reads them); inference makes one set and lets every layer reuse it, since a
/// layer's forward reads nothing an earlier layer left there.
pub(crate) fn per_layer<S: Clone>(
    count: usize,
    training: bool,
    mut make: impl FnMut(usize) -> Result<S, GpuError>,
) -> Result<Vec<S>, GpuError> {
    if training || count == 0 {
        return (0..count).map(make).collect();
    }
    Ok(vec![make(0)?; count])
}

/// `count` outputs of a chain of steps (layer outputs, top-attn's block outputs), each
/// step reading output i and writing output i + 1. Training keeps every one (the backward
/// reads them); inference takes two buffers in turn.
pub(crate) fn in_turn<T: Clone>(
    count: usize,
    training: bool,
    mut make: impl FnMut(usize) -> Result<T, GpuError>,
) -> Result<Vec<T>, GpuError> {
    let kept = if training { count } else { count.min(2) };
    let buffers = (0..kept).map(&mut make).collect::<Result<Vec<_>, _>>()?;
    Ok((0..count).map(|i| buffers[i % kept].clone()).collect())
}

// ----------------------------------------------------------------------------------------
// Copies and dropout

/// y = x.
pub(crate) fn copy(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<(), GpuError> {
    elementwise::copy(rec, x, y)
}

/// y = Dropout(x) into `out` through `scratch` (x written to `scratch` by the caller), or
/// `x` written straight to `out` without dropout: returns where the caller writes x.
pub(crate) fn dropout_target<'t>(
    out: &'t Tensor,
    scratch: &'t Tensor,
    drop: Option<DropoutSpec>,
) -> &'t Tensor {
    if drop.is_some() { scratch } else { out }
}

/// The second half of `dropout_target`: out = Dropout(scratch) when there is dropout.
pub(crate) fn dropout_finish(
    rec: &mut Recorder,
    scratch: &Tensor,
    out: &Tensor,
    drop: Option<DropoutSpec>,
) -> Result<(), GpuError> {
    match drop {
        Some(spec) => elementwise::dropout(rec, scratch, out, spec),
        None => Ok(()),
    }
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

/// The gradient a sublayer's backward starts from.
#[derive(Clone, Copy)]
pub(crate) enum OutputGrad<'t> {
    /// Of its output after dropout: the dropout's backward is still to run.
    Dropped(&'t Tensor),
    /// Of its projection, before dropout (the LayerNorm's backward applied the mask).
    Projection(&'t Tensor),
}

pub(crate) fn stats<'a>(mean: &'a Tensor, rstd: &'a Tensor) -> LayerNormStats<'a> {
    LayerNormStats { mean, rstd }
}

// ----------------------------------------------------------------------------------------
// Linear

/// A Linear's weight [out, in] and bias [out] (or their gradients).
#[derive(Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Tensor,
    /// Mixed precision: W rounded to f16, what the products read (the optimizer rewrites
    /// it with every update of W). None in f32, and for gradients.
    pub w16: Option<Tensor>,
}

/// A LayerNorm's γ and β [width] (or their gradients).
#[derive(Clone)]
pub struct Norm {
    pub gamma: Tensor,
    pub beta: Tensor,
}

impl Norm {
    pub(crate) fn layernorm(&self, eps: f64) -> LayerNorm<'_> {
        LayerNorm::new(&self.gamma, &self.beta, eps as f32)
    }

    pub(crate) fn grads<'a>(&'a self, dx: &'a Tensor) -> LayerNormGrads<'a> {
        LayerNormGrads { dx, dgamma: &self.gamma, dbeta: &self.beta }
    }
}

/// How a backward writes a Linear's parameter gradients: overwritten, or added to for a
/// Linear shared by several call sites (PALs' encoder and decoder serve every layer).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum GradMode {
    Overwrite,
    Accumulate,
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

/// dx += dy·W for y = x·Wᵀ + b.
pub(crate) fn add_input_grad(
    rec: &mut Recorder,
    rows: usize,
    w: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<(), GpuError> {
    let (out, inner) = (w.shape[0], w.shape[1]);
    matmul(rec, dy, w, dx, &Matmul::new(rows, inner, out), Epilogue::Accumulate)
}

impl Linear {
    /// The weight the products read: the f16 copy where there is one.
    pub(crate) fn operand(&self) -> &Tensor {
        self.w16.as_ref().unwrap_or(&self.w)
    }

    /// y = x·Wᵀ + b for x [rows, in].
    pub(crate) fn forward(
        &self,
        rec: &mut Recorder,
        rows: usize,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<(), GpuError> {
        linear(rec, rows, x, self.operand(), y, Epilogue::Bias(&self.b))
    }

    /// y = GELU(x·Wᵀ + b), keeping x·Wᵀ + b in `pre`.
    pub(crate) fn forward_gelu(
        &self,
        rec: &mut Recorder,
        rows: usize,
        x: &Tensor,
        y: &Tensor,
        pre: &Tensor,
    ) -> Result<(), GpuError> {
        linear(rec, rows, x, self.operand(), y, Epilogue::BiasGelu { bias: &self.b, pre })
    }

    /// out = Dropout(x·Wᵀ + b), the dropout in the product's epilogue.
    pub(crate) fn forward_dropout(
        &self,
        rec: &mut Recorder,
        rows: usize,
        x: &Tensor,
        out: &Tensor,
        drop: Option<DropoutSpec>,
    ) -> Result<(), GpuError> {
        let epilogue = match drop {
            Some(drop) => Epilogue::BiasDropout { bias: &self.b, drop },
            None => Epilogue::Bias(&self.b),
        };
        linear(rec, rows, x, self.operand(), out, epilogue)
    }

    /// Gradients of y = x·Wᵀ + b from dy [rows, out] into `grads` (db = colsum(dy),
    /// dW = dyᵀ·x, as `mode` says), and dx = dy·W, or dx += dy·W with
    /// `Epilogue::Accumulate`, when `dx` is given. `colsum` holds the column sum's partials.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        rec: &mut Recorder,
        rows: usize,
        x: &Tensor,
        dy: &Tensor,
        (grads, mode): (&Linear, GradMode),
        dx: Option<(&Tensor, Epilogue)>,
        colsum: &Tensor,
    ) -> Result<(), GpuError> {
        let (out, inner) = (self.w.shape[0], self.w.shape[1]);
        let accumulate = mode == GradMode::Accumulate;
        reduce::colsum_with_scratch(rec, dy, &grads.b, accumulate, colsum)?;
        let dw_epilogue = if accumulate { Epilogue::Accumulate } else { Epilogue::None };
        matmul(rec, dy, x, &grads.w, &Matmul::new(out, inner, rows).trans_a(), dw_epilogue)?;
        match dx {
            Some((dx, epilogue)) => {
                matmul(rec, dy, self.operand(), dx, &Matmul::new(rows, inner, out), epilogue)
            }
            None => Ok(()),
        }
    }
}

// ----------------------------------------------------------------------------------------
// Bottleneck

/// x ↦ up(GELU(down(x))): a low-rank layer or an adapter.
#[derive(Clone)]
pub struct Bottleneck {
    pub down: Linear,
    pub up: Linear,
}

/// A bottleneck's scratch [rows, r]: GELU(pre), d pre.
pub(crate) struct BottleneckScratch<'a> {
    pub g: &'a Tensor,
    pub d_pre: &'a Tensor,
}

/// A bottleneck's scratch, owned: GELU(pre) [rows, r] (forward and backward), and for the
/// backward d pre (empty for inference).
pub struct BottleneckBuffers<T> {
    pub g: T,
    pub d_pre: T,
}

impl<T> BottleneckBuffers<T> {
    pub(crate) fn build(
        (rows, backward_rows, r): (usize, usize, usize),
        a: NamedAlloc<T>,
    ) -> Result<Self, GpuError> {
        Ok(BottleneckBuffers {
            g: a("scratch.bottleneck.g", &[rows, r])?,
            d_pre: a("scratch.bottleneck.d_pre", &[backward_rows, r])?,
        })
    }
}

impl BottleneckBuffers<Tensor> {
    pub(crate) fn scratch(&self) -> BottleneckScratch<'_> {
        BottleneckScratch { g: &self.g, d_pre: &self.d_pre }
    }
}

impl Bottleneck {
    /// up(GELU(down(x))) into `out`, keeping the pre-activation in `pre` and GELU in `g`.
    pub(crate) fn forward(
        &self,
        rec: &mut Recorder,
        rows: usize,
        x: &Tensor,
        (pre, g): (&Tensor, &Tensor),
        out: &Tensor,
    ) -> Result<(), GpuError> {
        self.down.forward_gelu(rec, rows, x, g, pre)?;
        self.up.forward(rec, rows, g, out)
    }

    /// The bottleneck's parameter gradients from d out `dy`, overwritten; leaves d pre in
    /// `s.d_pre` (the caller adds d pre·down.w to its input's gradient when that is ready).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        rec: &mut Recorder,
        rows: usize,
        grads: &Bottleneck,
        (x, pre): (&Tensor, &Tensor),
        dy: &Tensor,
        s: &BottleneckScratch,
        colsum: &Tensor,
    ) -> Result<(), GpuError> {
        elementwise::gelu(rec, pre, s.g)?;
        let dx = Some((s.d_pre, Epilogue::GeluBackward { pre }));
        self.up.backward(rec, rows, s.g, dy, (&grads.up, GradMode::Overwrite), dx, colsum)?;
        self.down.backward(rec, rows, x, s.d_pre, (&grads.down, GradMode::Overwrite), None, colsum)
    }
}

// ----------------------------------------------------------------------------------------
// The attention sublayer

/// BERT's attention sublayer: y = LN(Dropout(MHA(x)·W_Oᵀ + b_O) + x), MHA with
/// [query, key, value] projections. The encoder's layers and top-attn's blocks are this.
#[derive(Clone)]
pub struct AttentionBlock {
    pub qkv: [Linear; 3],
    pub output: Linear,
    pub norm: Norm,
}

/// What the sublayer's forward keeps for its backward (rows = B·S, width W).
#[derive(Clone)]
pub struct AttentionActs<T> {
    /// [rows, W] = [B, S, heads, W/heads]
    pub q: T,
    pub k: T,
    pub v: T,
    /// The attention output [rows, W] and its log-sum-exps [B, heads, S].
    pub ctx: T,
    pub lse: T,
    /// Dropout(ctx·W_Oᵀ + b_O) [rows, W], plus any term a method adds: the LayerNorm's
    /// input (x is its residual).
    pub out: T,
    pub ln_mean: T,
    pub ln_rstd: T,
}

impl<T> AttentionActs<T> {
    /// The buffers named `{prefix}{q,k,v,ctx,lse}` and `{prefix}{out, ln_mean, ln_rstd}`
    /// with the names in `names` (the encoder keeps its historical names). q, k and v are
    /// `qkv` (f16 in mixed precision: only matmuls and the attention kernels touch them).
    pub(crate) fn build(
        shape: AttentionShape,
        names: [&str; 3],
        qkv: ElementType,
        a: TypedAlloc<T>,
    ) -> Result<Self, GpuError> {
        let (rows, width) = (shape.batch * shape.seq, shape.heads * shape.head_dim);
        let lse = [shape.batch, shape.heads, shape.seq];
        Ok(AttentionActs {
            q: a("q", &[rows, width], qkv)?,
            k: a("k", &[rows, width], qkv)?,
            v: a("v", &[rows, width], qkv)?,
            ctx: a("ctx", &[rows, width], ElementType::F32)?,
            lse: a("lse", &lse, ElementType::F32)?,
            out: a(names[0], &[rows, width], ElementType::F32)?,
            ln_mean: a(names[1], &[rows], ElementType::F32)?,
            ln_rstd: a(names[2], &[rows], ElementType::F32)?,
        })
    }
}

/// Scratch of the sublayer's forward and backward, shared by all layers (rows = B·S).
pub(crate) struct AttentionScratch<'a> {
    /// [rows, W]: forward, the output before its dropout; backward, its gradient after
    /// dropout's backward.
    pub sub: &'a Tensor,
    /// [rows, W] each; dq may be `sub` (read before dq is written).
    pub d_ctx: &'a Tensor,
    pub dq: &'a Tensor,
    pub dk: &'a Tensor,
    pub dv: &'a Tensor,
    /// [B, heads, S]
    pub delta: &'a Tensor,
    pub ln: LayerNormScratch<'a>,
    pub colsum: &'a Tensor,
}

/// The sublayer's shape, mask and dropout for one step.
pub(crate) struct AttentionStep<'a> {
    pub shape: AttentionShape,
    pub mask: &'a Tensor,
    /// Attention-probability dropout (NONE without a key) and output dropout.
    pub probs_drop: DropoutSpec,
    pub out_drop: Option<DropoutSpec>,
}

impl AttentionStep<'_> {
    fn rows(&self) -> usize {
        self.shape.batch * self.shape.seq
    }
}

impl AttentionBlock {
    /// acts.out = Dropout(MHA(x)·W_Oᵀ + b_O): the sublayer up to its LayerNorm (the
    /// encoder lets a method add its term to acts.out here).
    pub(crate) fn attend(
        &self,
        rec: &mut Recorder,
        step: &AttentionStep,
        x: &Tensor,
        acts: &AttentionActs<Tensor>,
    ) -> Result<(), GpuError> {
        let rows = step.rows();
        for (p, out) in self.qkv.iter().zip([&acts.q, &acts.k, &acts.v]) {
            p.forward(rec, rows, x, out)?;
        }
        let (shape, scale, mask) = (step.shape, step.shape.scale(), step.mask);
        let (q, k, v, drop) = (&acts.q, &acts.k, &acts.v, step.probs_drop);
        attention::attention_forward(rec, shape, q, k, v, mask, &acts.ctx, &acts.lse, scale, drop)?;
        self.output.forward_dropout(rec, rows, &acts.ctx, &acts.out, step.out_drop)
    }

    /// y = LN(acts.out + x).
    pub(crate) fn normalize(
        &self,
        rec: &mut Recorder,
        eps: f64,
        x: &Tensor,
        acts: &AttentionActs<Tensor>,
        y: &Tensor,
    ) -> Result<(), GpuError> {
        let ln_stats = stats(&acts.ln_mean, &acts.ln_rstd);
        layernorm::layernorm_forward(rec, &self.norm.layernorm(eps), &acts.out, Some(x), y, &ln_stats)
    }

    /// The LayerNorm's backward from d y: γ and β gradients into `grads.norm`, and
    /// d(acts.out) into `dx`, which is also d x through the residual. With `through`
    /// (the output's dropout and a tensor), also the gradient before that dropout into the
    /// tensor, in the same pass. Returns the gradient `attend_backward` starts from.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn normalize_backward<'t>(
        &self,
        rec: &mut Recorder,
        eps: f64,
        grads: &AttentionBlock,
        (x, acts): (&Tensor, &AttentionActs<Tensor>),
        dy: &Tensor,
        dx: &'t Tensor,
        ln: &LayerNormScratch,
        through: Option<(DropoutSpec, &'t Tensor)>,
    ) -> Result<OutputGrad<'t>, GpuError> {
        let ln_stats = stats(&acts.ln_mean, &acts.ln_rstd);
        let (norm, out) = (self.norm.layernorm(eps), &acts.out);
        let grads = grads.norm.grads(dx);
        layernorm::residual_layernorm_backward(rec, &norm, (out, x), &ln_stats, dy, &grads, through, ln)?;
        Ok(match through {
            Some((_, d_proj)) => OutputGrad::Projection(d_proj),
            None => OutputGrad::Dropped(dx),
        })
    }

    /// The gradients of `attend` from d(acts.out) in `d_out`: every parameter's
    /// (overwritten), and d x added to `dx`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_backward(
        &self,
        rec: &mut Recorder,
        step: &AttentionStep,
        grads: &AttentionBlock,
        (x, acts): (&Tensor, &AttentionActs<Tensor>),
        d_out: OutputGrad,
        dx: &Tensor,
        s: &AttentionScratch,
    ) -> Result<(), GpuError> {
        let rows = step.rows();
        let d_proj = match d_out {
            OutputGrad::Dropped(d) => dropout_backward(rec, d, s.sub, step.out_drop)?,
            OutputGrad::Projection(d) => d,
        };
        let to_ctx = Some((s.d_ctx, Epilogue::None));
        self.output.backward(
            rec,
            rows,
            &acts.ctx,
            d_proj,
            (&grads.output, GradMode::Overwrite),
            to_ctx,
            s.colsum,
        )?;
        let (shape, scale, drop) = (step.shape, step.shape.scale(), step.probs_drop);
        let (q, k, v, ctx) = (&acts.q, &acts.k, &acts.v, &acts.ctx);
        #[rustfmt::skip]
        attention::attention_backward(
            rec, shape, q, k, v, ctx, s.d_ctx, step.mask, &acts.lse, s.delta, s.dq, s.dk, s.dv, scale, drop,
        )?;
        for ((p, g), dy) in self.qkv.iter().zip(&grads.qkv).zip([s.dq, s.dk, s.dv]) {
            let to_x = Some((dx, Epilogue::Accumulate));
            p.backward(rec, rows, x, dy, (g, GradMode::Overwrite), to_x, s.colsum)?;
        }
        Ok(())
    }
}
