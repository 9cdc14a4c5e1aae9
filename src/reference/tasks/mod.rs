//! Task-specific terms and heads on the CPU, in f64, built on reference::bert's layer hooks:
//! the exact function model/tasks/ computes on the GPU (formulas and names are there), one
//! file per method as there.
//! A training step of one task: forward with the task's terms, head, loss, and every
//! gradient (the encoder's and the task's).

pub mod adapters;
pub mod low_rank;
pub mod pals;
pub mod top_attn;

use super::bert::{self as encoder, Grads, HookContext, LayerHook, NoHook};
use super::{elementwise, loss, matmul};
use crate::contract::{DropoutKey, DropoutSpec, SITE_HEAD};
use crate::model::tasks::{Method, Targets, TaskSpec, task_param_shapes, task_prefix};
use crate::model::{BertConfig, EncoderBatch, HostTensor, Weights};

pub(crate) fn add(x: &[f64], y: &[f64]) -> Vec<f64> {
    x.iter().zip(y).map(|(a, b)| a + b).collect()
}

pub(crate) fn gelu(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&z| elementwise::gelu(z)).collect()
}

/// dy ⊙ GELU'(pre).
pub(crate) fn gelu_backward(pre: &[f64], dy: &[f64]) -> Vec<f64> {
    dy.iter().zip(pre).map(|(d, &z)| d * elementwise::gelu_grad(z)).collect()
}

/// g[name] += grad: parameters shared by several layers collect every layer's share.
pub(crate) fn accumulate(g: &mut Grads, name: &str, grad: Vec<f64>) {
    match g.get_mut(name) {
        Some(sum) => sum.iter_mut().zip(&grad).for_each(|(s, v)| *s += v),
        None => {
            g.insert(name.to_string(), grad);
        }
    }
}

/// A Linear's parameters in f64 and its name: weight [out, in], bias [out].
pub struct Linear {
    name: String,
    w: Vec<f64>,
    b: Vec<f64>,
    out: usize,
    inp: usize,
}

impl Linear {
    pub fn forward(&self, x: &[f64], rows: usize) -> Vec<f64> {
        matmul::linear_forward_f64(x, &self.w, Some(&self.b), rows, self.out, self.inp)
    }

    /// Adds dW and db to `g`; returns dx.
    pub fn backward(&self, x: &[f64], dy: &[f64], rows: usize, g: &mut Grads) -> Vec<f64> {
        let (dx, dw, db) = matmul::linear_backward_f64(x, &self.w, dy, rows, self.out, self.inp);
        accumulate(g, &format!("{}.weight", self.name), dw);
        accumulate(g, &format!("{}.bias", self.name), db);
        dx
    }
}

/// One task's parameters in `weights`, under its name's prefix.
pub struct TaskParams<'a> {
    pub config: &'a BertConfig,
    pub prefix: String,
    pub weights: &'a Weights,
}

impl TaskParams<'_> {
    /// A parameter vector (a LayerNorm's γ or β) by its name after the task's prefix.
    pub fn vector(&self, name: &str) -> Vec<f64> {
        let full = format!("{}{name}", self.prefix);
        let t = self.weights.get(&full).unwrap_or_else(|| panic!("missing parameter {full}"));
        t.data.iter().map(|&v| v as f64).collect()
    }

    /// Dropout at `site` with probability `p`: none (p = 0) without a key.
    pub fn dropout_spec(&self, ctx: &HookContext, site: u32, p: f64) -> DropoutSpec {
        DropoutSpec::at_or_none(ctx.dropout, p, site)
    }

    pub fn linear(&self, name: &str) -> Linear {
        let name = format!("{}{name}", self.prefix);
        let get = |suffix: &str| {
            let full = format!("{name}.{suffix}");
            self.weights.get(&full).unwrap_or_else(|| panic!("missing parameter {full}"))
        };
        let (w, b) = (get("weight"), get("bias"));
        let widen = |t: &HostTensor| t.data.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        Linear { w: widen(w), b: widen(b), out: w.shape[0], inp: w.shape[1], name }
    }
}

/// up(GELU(down(x))) of a low-rank layer or an adapter.
fn bottleneck_forward(ctx: &HookContext, x: &[f64], (down, up): (Linear, Linear)) -> Vec<f64> {
    up.forward(&gelu(&down.forward(x, ctx.rows())), ctx.rows())
}

/// Stores the bottleneck's gradients; returns d x.
fn bottleneck_backward(
    ctx: &HookContext,
    x: &[f64],
    dy: &[f64],
    (down, up): (Linear, Linear),
    g: &mut Grads,
) -> Vec<f64> {
    let rows = ctx.rows();
    let pre = down.forward(x, rows);
    let d_act = up.backward(&gelu(&pre), dy, rows, g);
    down.backward(x, &gelu_backward(&pre, &d_act), rows, g)
}

/// One task's terms inside the layers, reading its parameters from `weights`: the one
/// match on the method.
pub struct TaskTerms;

impl TaskTerms {
    #[allow(clippy::new_ret_no_self)]
    pub fn new<'a>(
        config: &'a BertConfig,
        method: Method,
        task: &TaskSpec,
        weights: &'a Weights,
    ) -> Box<dyn LayerHook + 'a> {
        let p = TaskParams { config, prefix: task_prefix(&task.name), weights };
        match method {
            Method::Shared | Method::Separate => Box::new(NoHook),
            Method::Pals { dim, heads } => Box::new(pals::Pals { p, dim, heads }),
            Method::LowRank { .. } => Box::new(low_rank::LowRank { p }),
            Method::Adapters { .. } => Box::new(adapters::Adapters { p }),
            Method::TopAttn { dim, heads, blocks } => Box::new(top_attn::TopAttn { p, dim, heads, blocks }),
        }
    }
}

/// Dropout with `spec`; on a gradient it is its own backward.
pub(crate) fn dropout(x: &[f64], spec: &DropoutSpec) -> Vec<f64> {
    elementwise::dropout_f64(x, spec)
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
    elementwise::dropout_f64(x, &DropoutSpec::at_or_none(dropout, c.hidden_dropout_prob, SITE_HEAD))
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

/// The task's head.
fn head_of(config: &BertConfig, task: &TaskSpec, weights: &Weights) -> Linear {
    TaskParams { config, prefix: task_prefix(&task.name), weights }.linear("head")
}

/// The forward of one task: (encoder cache, head input, logits [B, k], loss).
fn forward(
    c: &BertConfig,
    (terms, head): (&dyn LayerHook, &Linear),
    task: &TaskSpec,
    shared: &Weights,
    batch: &TaskBatch,
    dropout: Option<DropoutKey>,
) -> (encoder::BertCache, Vec<f64>, Vec<f64>, (f64, Vec<f64>)) {
    let (cache, _, _) = encoder::forward_with(c, shared, batch.encoder, dropout, terms);
    let input = head_dropout(c, &cache.pooled, dropout);
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
    let head = head_of(c, task, task_weights);
    forward(c, (terms.as_ref(), &head), task, shared, batch, dropout).3.0
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
    let head = head_of(c, task, task_weights);
    let (cache, input, logits, (loss, d_logits)) =
        forward(c, (terms.as_ref(), &head), task, shared, batch, dropout);
    let mut head_grads = Grads::new();
    let rows = batch.encoder.batch;
    let d_input = head.backward(&input, &d_logits, rows, &mut head_grads);
    let d_pooled = head_dropout(c, &d_input, dropout);
    let d_seq = vec![0.0; rows * batch.encoder.seq * c.hidden_size];
    let (shared_grads, mut rest) =
        encoder::backward_with(c, shared, batch.encoder, &cache, &d_seq, &d_pooled, terms.as_ref());
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
    use crate::contract::{Site, dropout_stream, site};
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

    const METHODS: [Method; 5] = [
        Method::Shared,
        Method::Pals { dim: 6, heads: 3 },
        Method::LowRank { rank: 4 },
        Method::Adapters { size: 3 },
        Method::TopAttn { dim: 6, heads: 2, blocks: 3 },
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

    const KEY: DropoutKey = DropoutKey::new(77, 5);

    /// METHODS[4]'s top, by its type.
    fn top_attn_of<'a>(c: &'a BertConfig, task: &TaskSpec, weights: &'a Weights) -> top_attn::TopAttn<'a> {
        let Method::TopAttn { dim, heads, blocks } = METHODS[4] else { unreachable!() };
        let p = TaskParams { config: c, prefix: task_prefix(&task.name), weights };
        top_attn::TopAttn { p, dim, heads, blocks }
    }

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
        for method in &METHODS[2..4] {
            for task in &tasks() {
                check(*method, task, None);
                check(*method, task, Some(KEY));
            }
        }
    }

    #[test]
    fn top_attn_matches_finite_differences() {
        for task in &tasks() {
            check(METHODS[4], task, None);
            check(METHODS[4], task, Some(KEY));
        }
    }

    /// Top-attn replaces the sequence output that the pooler reads; its dropout draws from
    /// the task-specific sites of virtual layers past the encoder's, and each site matters.
    #[test]
    fn top_attn_replaces_the_sequence_output() {
        let c = config();
        let method = METHODS[4];
        let task = TaskSpec::new("RTE", 2);
        let shared = perturbed(random_weights(&c, 1), 100);
        let task_weights = perturbed(random_task_weights(&c, &method, &task, 2), 200);
        let encoder = encoder_batch(&c, 3, 5);
        let terms = top_attn_of(&c, &task, &task_weights);
        let (plain, _, _) = encoder::forward(&c, &shared, &encoder, None);
        let (top, sequence, _) = encoder::forward_with(&c, &shared, &encoder, None, &terms);
        assert_eq!(top.encoder_output, plain.sequence);
        assert_ne!(top.sequence, plain.sequence);
        assert_eq!(sequence, top.sequence.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let mask: Vec<f64> = encoder.additive_mask().iter().map(|&m| m as f64).collect();
        let ctx = HookContext { layer: 2, batch: 3, seq: 5, mask: &mask, dropout: Some(KEY) };
        assert_eq!(
            top.sequence,
            terms.top_forward(&HookContext { dropout: None, ..ctx }, &plain.sequence).out
        );
        for i in 0..3 {
            let (_, _, attention, output) = terms.top_attention(&ctx, i);
            assert_eq!(attention.stream, dropout_stream(KEY.step, site(2 + 2 * i, Site::TaskSpecific)));
            assert_eq!(output.stream, dropout_stream(KEY.step, site(3 + 2 * i, Site::TaskSpecific)));
        }
        // Each of the top's two dropouts changes its output.
        for (hidden, attention) in [(0.2, 0.0), (0.0, 0.25)] {
            let c = BertConfig {
                hidden_dropout_prob: hidden,
                attention_probs_dropout_prob: attention,
                ..c.clone()
            };
            let terms = top_attn_of(&c, &task, &task_weights);
            let with = terms.top_forward(&ctx, &plain.sequence).out;
            let without = terms.top_forward(&HookContext { dropout: None, ..ctx }, &plain.sequence).out;
            assert_ne!(with, without, "hidden {hidden}, attention {attention}");
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
        let Method::Pals { dim, heads } = method else { unreachable!() };
        let p = TaskParams { config: &c, prefix: task_prefix(&task.name), weights: &task_weights };
        let terms = pals::Pals { p, dim, heads };
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
            TaskTerms::new(&c, Method::Shared, &task, &task_weights).as_ref(),
        );
        assert_eq!(seq, seq_with);
        assert_eq!(cache.pooled, cache_with.pooled);
        let result = step(&c, Method::Shared, &shared, &task, &task_weights, &batch, None);
        assert_eq!(result.task_grads.len(), 2);
    }
}
