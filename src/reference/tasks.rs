//! Task-specific terms and heads on the CPU, in f64, built on reference::bert's layer hooks:
//! the exact function model/tasks.rs computes on the GPU (formulas and names are there).
//! A training step of one task: forward with the task's terms, head, loss, and every
//! gradient (the encoder's and the task's).

use super::bert::{self as encoder, Grads, HookContext, LayerHook};
use super::{attention, elementwise, loss, matmul};
use crate::kernels::attention::AttentionShape;
use crate::kernels::elementwise::DropoutSpec;
use crate::model::tasks::{Method, Targets, TaskSpec, task_param_shapes, task_prefix};
use crate::model::{
    BertConfig, DropoutKey, EncoderBatch, HostTensor, SITE_HEAD, Site, Weights, dropout_stream, site,
};

fn add(x: &[f64], y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(a, b)| a + b).collect()
}

fn gelu(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&z| elementwise::gelu(z)).collect()
}

/// dy ⊙ GELU'(pre).
fn gelu_backward(pre: &[f64], dy: &[f64]) -> Vec<f64> {
    dy.iter().zip(pre).map(|(d, &z)| d * elementwise::gelu_grad(z)).collect()
}

/// g[name] += grad: parameters shared by several layers collect every layer's share.
fn accumulate(g: &mut Grads, name: &str, grad: Vec<f64>) {
    match g.get_mut(name) {
        Some(sum) => sum.iter_mut().zip(&grad).for_each(|(s, v)| *s += v),
        None => {
            g.insert(name.to_string(), grad);
        }
    }
}

/// A Linear's parameters in f64 and its name: weight [out, in], bias [out].
struct Linear {
    name: String,
    w: Vec<f64>,
    b: Vec<f64>,
    out: usize,
    inp: usize,
}

impl Linear {
    fn forward(&self, x: &[f64], rows: usize) -> Vec<f64> {
        matmul::linear_forward_f64(x, &self.w, Some(&self.b), rows, self.out, self.inp)
    }

    /// Adds dW and db to `g`; returns dx.
    fn backward(&self, x: &[f64], dy: &[f64], rows: usize, g: &mut Grads) -> Vec<f64> {
        let (dx, dw, db) = matmul::linear_backward_f64(x, &self.w, dy, rows, self.out, self.inp);
        accumulate(g, &format!("{}.weight", self.name), dw);
        accumulate(g, &format!("{}.bias", self.name), db);
        dx
    }
}

/// One task's terms inside the layers, reading its parameters from `weights`.
pub struct TaskTerms<'a> {
    config: &'a BertConfig,
    method: Method,
    prefix: String,
    weights: &'a Weights,
}

/// What the PAL forward computes, for its backward.
struct PalCache {
    enc: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    ctx: Vec<f64>,
    pre: Vec<f64>,
}

impl<'a> TaskTerms<'a> {
    pub fn new(
        config: &'a BertConfig,
        method: Method,
        task: &TaskSpec,
        weights: &'a Weights,
    ) -> TaskTerms<'a> {
        TaskTerms { config, method, prefix: task_prefix(&task.name), weights }
    }

    fn linear(&self, name: &str) -> Linear {
        let name = format!("{}{name}", self.prefix);
        let get = |suffix: &str| {
            let full = format!("{name}.{suffix}");
            self.weights.get(&full).unwrap_or_else(|| panic!("missing parameter {full}"))
        };
        let (w, b) = (get("weight"), get("bias"));
        let widen = |t: &HostTensor| t.data.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        Linear { w: widen(w), b: widen(b), out: w.shape[0], inp: w.shape[1], name }
    }

    /// (down, up) of a bottleneck: low-rank layer l, or adapter l at `site`.
    fn bottleneck(&self, l: usize, site: &str) -> (Linear, Linear) {
        match self.method {
            Method::LowRank { .. } => (
                self.linear(&format!("low_rank.layer.{l}.encoder")),
                self.linear(&format!("low_rank.layer.{l}.decoder")),
            ),
            _ => (
                self.linear(&format!("adapter.layer.{l}.{site}.down")),
                self.linear(&format!("adapter.layer.{l}.{site}.up")),
            ),
        }
    }

    fn bottleneck_forward(&self, ctx: &HookContext, x: &[f64], site: &str) -> Vec<f64> {
        let (down, up) = self.bottleneck(ctx.layer, site);
        up.forward(&gelu(&down.forward(x, ctx.rows())), ctx.rows())
    }

    /// Stores the bottleneck's gradients; returns d x.
    fn bottleneck_backward(
        &self,
        ctx: &HookContext,
        x: &[f64],
        dy: &[f64],
        site: &str,
        g: &mut Grads,
    ) -> Vec<f64> {
        let (down, up) = self.bottleneck(ctx.layer, site);
        let rows = ctx.rows();
        let pre = down.forward(x, rows);
        let d_act = up.backward(&gelu(&pre), dy, rows, g);
        down.backward(x, &gelu_backward(&pre, &d_act), rows, g)
    }

    fn pal_attention(&self, ctx: &HookContext) -> (AttentionShape, f64, DropoutSpec) {
        let Method::Pals { dim, heads } = self.method else { panic!("not PALs") };
        let shape = AttentionShape { batch: ctx.batch, seq: ctx.seq, heads, head_dim: dim / heads };
        let drop = match ctx.dropout {
            Some(key) => DropoutSpec {
                p: self.config.attention_probs_dropout_prob as f32,
                seed: key.seed,
                stream: dropout_stream(key.step, site(ctx.layer, Site::TaskSpecific)),
            },
            None => DropoutSpec { p: 0.0, seed: 0, stream: 0 },
        };
        (shape, 1.0 / ((dim / heads) as f64).sqrt(), drop)
    }

    fn pal_layer(&self, l: usize) -> [Linear; 3] {
        ["query", "key", "value"].map(|w| self.linear(&format!("pal.layer.{l}.{w}")))
    }

    fn pal_forward(&self, ctx: &HookContext, h: &[f64]) -> PalCache {
        let rows = ctx.rows();
        let enc = self.linear("pal.encoder").forward(h, rows);
        let [q, k, v] = self.pal_layer(ctx.layer).map(|p| p.forward(&enc, rows));
        let (shape, scale, drop) = self.pal_attention(ctx);
        let (attn, _) = attention::forward_f64(&shape, &q, &k, &v, ctx.mask, scale, &drop);
        let pre = self.linear("pal.decoder").forward(&attn, rows);
        PalCache { enc, q, k, v, ctx: attn, pre }
    }

    /// Stores PALs' gradients (V^E and V^D summed over layers); returns d h.
    fn pal_backward(&self, ctx: &HookContext, h: &[f64], d_term: &[f64], g: &mut Grads) -> Vec<f64> {
        let rows = ctx.rows();
        let c = self.pal_forward(ctx, h);
        let d_pre = gelu_backward(&c.pre, d_term);
        let d_ctx = self.linear("pal.decoder").backward(&c.ctx, &d_pre, rows, g);
        let (shape, scale, drop) = self.pal_attention(ctx);
        let (dq, dk, dv) = attention::backward_f64(&shape, &c.q, &c.k, &c.v, ctx.mask, &d_ctx, scale, &drop);
        let mut d_enc = vec![0.0; c.enc.len()];
        for (p, dy) in self.pal_layer(ctx.layer).iter().zip([dq, dk, dv]) {
            d_enc = add(&d_enc, &p.backward(&c.enc, &dy, rows, g));
        }
        self.linear("pal.encoder").backward(h, &d_enc, rows, g)
    }
}

impl LayerHook for TaskTerms<'_> {
    fn attention_term(&self, ctx: &HookContext, x: &[f64]) -> Option<Vec<f64>> {
        match self.method {
            Method::Adapters { .. } => Some(self.bottleneck_forward(ctx, x, "attention")),
            _ => None,
        }
    }

    fn ffn_term(&self, ctx: &HookContext, h: &[f64], a: &[f64]) -> Option<Vec<f64>> {
        match self.method {
            Method::Shared => None,
            Method::Pals { .. } => Some(gelu(&self.pal_forward(ctx, h).pre)),
            Method::LowRank { .. } => Some(self.bottleneck_forward(ctx, h, "")),
            Method::Adapters { .. } => Some(self.bottleneck_forward(ctx, a, "ffn")),
        }
    }

    fn attention_term_backward(
        &self,
        ctx: &HookContext,
        x: &[f64],
        d: &[f64],
        g: &mut Grads,
    ) -> Option<Vec<f64>> {
        match self.method {
            Method::Adapters { .. } => Some(self.bottleneck_backward(ctx, x, d, "attention", g)),
            _ => None,
        }
    }

    fn ffn_term_backward(
        &self,
        ctx: &HookContext,
        h: &[f64],
        a: &[f64],
        d: &[f64],
        g: &mut Grads,
    ) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
        match self.method {
            Method::Shared => (None, None),
            Method::Pals { .. } => (Some(self.pal_backward(ctx, h, d, g)), None),
            Method::LowRank { .. } => (Some(self.bottleneck_backward(ctx, h, d, "", g)), None),
            Method::Adapters { .. } => (None, Some(self.bottleneck_backward(ctx, a, d, "ffn", g))),
        }
    }
}

/// One task's batch: what it is trained against, with per-example weights (0 masks one).
pub struct TaskBatch<'a> {
    pub encoder: &'a EncoderBatch,
    pub targets: &'a Targets,
    pub weights: &'a [f32],
}

/// The result of one step.
pub struct Step {
    pub loss: f64,
    /// [B, k]
    pub logits: Vec<f64>,
    /// The encoder's gradients, named as `param_shapes`.
    pub shared_grads: Weights,
    /// The task's gradients, named as `task_param_shapes`.
    pub task_grads: Weights,
}

/// The head's dropout at `SITE_HEAD`: none without a key.
fn head_dropout(c: &BertConfig, x: &[f64], dropout: Option<DropoutKey>) -> Vec<f64> {
    match dropout {
        Some(key) => {
            let stream = dropout_stream(key.step, SITE_HEAD);
            elementwise::dropout_f64(x, c.hidden_dropout_prob as f32, key.seed, stream)
        }
        None => x.to_vec(),
    }
}

/// (loss, d logits) of the task's loss: cross-entropy, or MSE against score / 5.
fn task_loss(task: &TaskSpec, logits: &[f64], batch: &TaskBatch) -> (f64, Vec<f64>) {
    let weights: Vec<f64> = batch.weights.iter().map(|&w| w as f64).collect();
    match batch.targets {
        Targets::Classes(labels) => {
            assert!(!task.is_regression(), "class labels for regression task {}", task.name);
            loss::cross_entropy_f64(logits, labels, &weights, task.num_labels, 1.0)
        }
        Targets::Scores(_) => {
            assert!(task.is_regression(), "scores for classification task {}", task.name);
            // The same f32 targets the GPU reads.
            let targets: Vec<f64> = batch.targets.words().iter().map(|&w| f32::from_bits(w) as f64).collect();
            loss::mse_f64(logits, &targets, &weights, 1.0)
        }
    }
}

/// The forward of one task: (encoder cache, head input, logits [B, k], loss).
fn forward(
    c: &BertConfig,
    terms: &TaskTerms,
    task: &TaskSpec,
    shared: &Weights,
    batch: &TaskBatch,
    dropout: Option<DropoutKey>,
) -> (encoder::BertCache, Vec<f64>, Vec<f64>, (f64, Vec<f64>)) {
    let (cache, _, _) = encoder::forward_with(c, shared, batch.encoder, dropout, terms);
    let input = head_dropout(c, &cache.pooled, dropout);
    let head = terms.linear("head");
    let logits = head.forward(&input, batch.encoder.batch);
    let loss = task_loss(task, &logits, batch);
    (cache, input, logits, loss)
}

/// The loss of one step of `task` alone (for finite differences).
#[allow(clippy::too_many_arguments)]
pub fn step_loss(
    c: &BertConfig,
    method: Method,
    shared: &Weights,
    task: &TaskSpec,
    task_weights: &Weights,
    batch: &TaskBatch,
    dropout: Option<DropoutKey>,
) -> f64 {
    let terms = TaskTerms::new(c, method, task, task_weights);
    forward(c, &terms, task, shared, batch, dropout).3.0
}

/// One training step of `task`: its loss and the gradients of the encoder and the task.
pub fn step(
    c: &BertConfig,
    method: Method,
    shared: &Weights,
    task: &TaskSpec,
    task_weights: &Weights,
    batch: &TaskBatch,
    dropout: Option<DropoutKey>,
) -> Step {
    let terms = TaskTerms::new(c, method, task, task_weights);
    let (cache, input, logits, (loss, d_logits)) = forward(c, &terms, task, shared, batch, dropout);
    let mut head_grads = Grads::new();
    let rows = batch.encoder.batch;
    let d_input = terms.linear("head").backward(&input, &d_logits, rows, &mut head_grads);
    let d_pooled = head_dropout(c, &d_input, dropout);
    let d_seq = vec![0.0; rows * batch.encoder.seq * c.hidden_size];
    let (shared_grads, mut rest) =
        encoder::backward_with(c, shared, batch.encoder, &cache, &d_seq, &d_pooled, &terms);
    rest.extend(head_grads);
    let task_grads = task_param_shapes(c, &method, task)
        .into_iter()
        .map(|(name, shape)| {
            let grad = rest.remove(&name).unwrap_or_else(|| panic!("no gradient for {name}"));
            (name, HostTensor::new(&shape, grad.iter().map(|&v| v as f32).collect()))
        })
        .collect();
    assert!(rest.is_empty(), "gradients without a parameter: {:?}", rest.keys());
    Step { loss, logits, shared_grads, task_grads }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tasks::random_task_weights;
    use crate::model::{param_shapes, random_weights};
    use crate::reference::{random_vec, rng};

    fn config() -> BertConfig {
        BertConfig {
            vocab_size: 20,
            max_position_embeddings: 16,
            hidden_dropout_prob: 0.2,
            attention_probs_dropout_prob: 0.25,
            ..BertConfig::tiny(2, 12, 2)
        }
    }

    const METHODS: [Method; 4] = [
        Method::Shared,
        Method::Pals { dim: 6, heads: 3 },
        Method::LowRank { rank: 4 },
        Method::Adapters { size: 3 },
    ];

    /// Weights large enough that every term matters: BERT's initialisation scaled up, with
    /// biases and LayerNorm parameters off 0 and 1.
    fn perturbed(mut w: Weights, seed: u32) -> Weights {
        for (index, (name, t)) in w.iter_mut().enumerate() {
            let r = random_vec(t.data.len(), seed + index as u32, 1.0);
            t.data = if name.contains("LayerNorm.weight") {
                r.iter().map(|v| 1.0 + 0.3 * v).collect()
            } else {
                r.iter().map(|v| 0.5 * v).collect()
            };
        }
        w
    }

    fn encoder_batch(c: &BertConfig, batch: usize, seq: usize) -> EncoderBatch {
        let rows = batch * seq;
        let ids = (0..rows as u32).map(|i| 1 + rng::rng_u32(3, 1, i) % (c.vocab_size as u32 - 1)).collect();
        let type_ids = (0..rows).map(|r| ((r % seq) >= seq / 2) as u32).collect();
        // The last sequence is half padding.
        let mask =
            (0..rows).map(|r| if r < (batch - 1) * seq || r % seq <= seq / 2 { 1.0 } else { 0.0 }).collect();
        EncoderBatch { batch, seq, ids, type_ids, mask }
    }

    fn targets(task: &TaskSpec, batch: usize) -> Targets {
        if task.is_regression() {
            Targets::Scores(
                (0..batch).map(|b| 5.0 * rng::rng_u32(8, 2, b as u32) as f32 / 4294967296.0).collect(),
            )
        } else {
            Targets::Classes((0..batch as u32).map(|b| b % task.num_labels as u32).collect())
        }
    }

    /// Central differences of the f64 loss at three entries of every parameter (task and
    /// encoder) against the analytic gradients; h = 2.5e-4 in f32 steps, tolerance
    /// |fd − analytic| ≤ 2e-6·max(1, |analytic|) (truncation ~h², the rest rounding).
    fn check(method: Method, task: &TaskSpec, dropout: Option<DropoutKey>) {
        let c = config();
        let shared = perturbed(random_weights(&c, 1), 100);
        let task_weights = perturbed(random_task_weights(&c, &method, task, 2), 200);
        let encoder = encoder_batch(&c, 3, 5);
        let targets = targets(task, 3);
        let weights = [1.0, 0.5, 1.0];
        let batch = TaskBatch { encoder: &encoder, targets: &targets, weights: &weights };
        let result = step(&c, method, &shared, task, &task_weights, &batch, dropout);
        assert_eq!(result.loss, step_loss(&c, method, &shared, task, &task_weights, &batch, dropout));
        let names: Vec<String> = task_param_shapes(&c, &method, task).into_iter().map(|(n, _)| n).collect();
        assert_eq!(result.task_grads.keys().cloned().collect::<Vec<_>>(), {
            let mut sorted = names.clone();
            sorted.sort();
            sorted
        });
        let h = 2.5e-4f32;
        let what = format!("{} {} {dropout:?}", method.name(), task.name);
        let check_one = |name: &str, is_task: bool| {
            let (weights, grads) =
                if is_task { (&task_weights, &result.task_grads) } else { (&shared, &result.shared_grads) };
            let len = weights[name].data.len();
            for t in 0..3u32 {
                let mut i = rng::rng_u32(11, name.len() as u32, t) as usize % len;
                if name.contains("word_embeddings") {
                    i = encoder.ids[i % encoder.ids.len()] as usize * c.hidden_size + i % c.hidden_size;
                }
                let at = |delta: f32| {
                    let mut w = weights.clone();
                    w.get_mut(name).unwrap().data[i] += delta;
                    let step = w[name].data[i] as f64;
                    let l = if is_task {
                        step_loss(&c, method, &shared, task, &w, &batch, dropout)
                    } else {
                        step_loss(&c, method, &w, task, &task_weights, &batch, dropout)
                    };
                    (l, step)
                };
                let ((plus, xp), (minus, xm)) = (at(h), at(-h));
                let fd = (plus - minus) / (xp - xm);
                let analytic = grads[name].data[i] as f64;
                let err = (fd - analytic).abs() / analytic.abs().max(1.0);
                assert!(err < 2e-6, "{what}: {name}[{i}]: fd {fd} analytic {analytic}");
            }
        };
        for name in &names {
            check_one(name, true);
        }
        for (name, _) in param_shapes(&c) {
            check_one(&name, false);
        }
        // Every term of the method reaches the loss.
        for name in names.iter().filter(|n| n.ends_with(".weight")) {
            assert!(result.task_grads[name].data.iter().any(|&v| v != 0.0), "{what}: {name} has no gradient");
        }
    }

    const KEY: DropoutKey = DropoutKey { seed: 77, step: 5 };

    fn tasks() -> [TaskSpec; 2] {
        [TaskSpec::new("MNLI", 3), TaskSpec::new("STS-B", 1)]
    }

    #[test]
    fn shared_and_pals_match_finite_differences() {
        for method in &METHODS[..2] {
            for task in &tasks() {
                check(*method, task, None);
                check(*method, task, Some(KEY));
            }
        }
    }

    #[test]
    fn low_rank_and_adapters_match_finite_differences() {
        for method in &METHODS[2..] {
            for task in &tasks() {
                check(*method, task, None);
                check(*method, task, Some(KEY));
            }
        }
    }

    /// PALs' attention dropout draws from its own site: with attention dropout alone, the
    /// key changes the task's term, and the term of another key differs.
    #[test]
    fn pal_attention_dropout_uses_the_task_site() {
        let c = BertConfig { hidden_dropout_prob: 0.0, ..config() };
        let method = METHODS[1];
        let task = TaskSpec::new("RTE", 2);
        let shared = perturbed(random_weights(&c, 1), 100);
        let task_weights = perturbed(random_task_weights(&c, &method, &task, 2), 200);
        let encoder = encoder_batch(&c, 3, 5);
        let targets = targets(&task, 3);
        let batch = TaskBatch { encoder: &encoder, targets: &targets, weights: &[1.0; 3] };
        let run = |c: &BertConfig, key| step_loss(c, method, &shared, &task, &task_weights, &batch, key);
        let no_encoder_dropout = BertConfig { attention_probs_dropout_prob: 0.0, ..c.clone() };
        assert_eq!(run(&no_encoder_dropout, Some(KEY)), run(&no_encoder_dropout, None));
        // Encoder attention dropout and PAL dropout share the probability, not the masks.
        let terms = TaskTerms::new(&c, method, &task, &task_weights);
        let mask = vec![0.0; 15];
        let ctx = HookContext { layer: 0, batch: 3, seq: 5, mask: &mask, dropout: Some(KEY) };
        assert_eq!(terms.pal_attention(&ctx).2.stream, dropout_stream(KEY.step, site(0, Site::TaskSpecific)));
        assert_ne!(run(&c, Some(KEY)), run(&c, None));
    }

    /// With the shared method the terms are nothing: the step's encoder gradients are the
    /// plain encoder's for d pooled from the head.
    #[test]
    fn shared_method_adds_nothing() {
        let c = config();
        let task = TaskSpec::new("SST-2", 2);
        let shared = perturbed(random_weights(&c, 1), 100);
        let task_weights = perturbed(random_task_weights(&c, &Method::Shared, &task, 2), 200);
        let encoder = encoder_batch(&c, 3, 5);
        let targets = targets(&task, 3);
        let batch = TaskBatch { encoder: &encoder, targets: &targets, weights: &[1.0; 3] };
        let (cache, seq, _) = encoder::forward(&c, &shared, &encoder, None);
        let (cache_with, seq_with, _) = encoder::forward_with(
            &c,
            &shared,
            &encoder,
            None,
            &TaskTerms::new(&c, Method::Shared, &task, &task_weights),
        );
        assert_eq!(seq, seq_with);
        assert_eq!(cache.pooled, cache_with.pooled);
        let result = step(&c, Method::Shared, &shared, &task, &task_weights, &batch, None);
        assert_eq!(result.task_grads.len(), 2);
    }
}
