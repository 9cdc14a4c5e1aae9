//! Multi-task steps on the GPU (model::tasks) against the CPU reference (reference::tasks),
//! for every method: the loss, the logits, every encoder gradient and every gradient of the
//! sampled task, with and without dropout; other tasks' gradients are left alone.
//! Tolerances: loss and logits rtol 1e-4 / atol 1e-6; gradients rtol 1e-3 / atol 1e-6 (the
//! reference keeps activations in f64, the GPU in f32; the gradients of a mean loss are
//! ~1e-3, so atol is 10x under bert_gpu.rs's; the tests pass at 1e-7 on lavapipe).

mod common;

use common::{assert_close, gpu};
use pals::error::ModelError;
use pals::gpu::GpuError;
use pals::model::bert::{Activations, BatchInputs};
use pals::model::tasks::{
    Bucket, HeadInputs, Method, MultiTaskModel, Targets, TaskActivations, TaskSpec, random_task_weights,
    task_param_shapes,
};
use pals::model::{BertConfig, DropoutKey, EncoderBatch, Weights, random_weights};
use pals::reference::random_vec;
use pals::reference::tasks::{self as reference, TaskBatch};

const OUT_RTOL: f32 = 1e-4;
const OUT_ATOL: f32 = 1e-6;
const GRAD_RTOL: f32 = 1e-3;
const GRAD_ATOL: f32 = 1e-6;

/// PAL width 12 in 6 heads of 2, top-attn six blocks of width 15 in 3 heads of 5; widths
/// that are no multiple of any tile.
const METHODS: [Method; 5] = [
    Method::Shared,
    Method::Pals { dim: 12, heads: 6 },
    Method::LowRank { rank: 7 },
    Method::Adapters { size: 5 },
    Method::TopAttn { dim: 15, heads: 3, blocks: 6 },
];

fn tiny() -> BertConfig {
    BertConfig { hidden_dropout_prob: 0.2, attention_probs_dropout_prob: 0.2, ..BertConfig::tiny(2, 32, 4) }
}

fn tasks() -> Vec<TaskSpec> {
    vec![TaskSpec::new("CoLA", 2), TaskSpec::new("STS-B", 1)]
}

/// Initialisations moved off BERT's so that every term matters: biases and LayerNorm
/// parameters get noise, task weights are 5x larger (std 0.1).
fn perturb(mut weights: Weights, seed: u32, scale_weights: f32) -> Weights {
    for (index, (name, tensor)) in weights.iter_mut().enumerate() {
        if name.ends_with("bias") || name.contains("LayerNorm") {
            let noise = random_vec(tensor.data.len(), seed + 1000 + index as u32, 0.1);
            tensor.data.iter_mut().zip(noise).for_each(|(v, n)| *v += n);
        } else {
            tensor.data.iter_mut().for_each(|v| *v *= scale_weights);
        }
    }
    weights
}

struct Setup {
    config: BertConfig,
    method: Method,
    shared: Weights,
    tasks: Vec<(TaskSpec, Weights)>,
}

fn setup(method: Method, seed: u32) -> Setup {
    let config = tiny();
    let shared = perturb(random_weights(&config, seed), seed, 1.0);
    let tasks = tasks()
        .into_iter()
        .map(|t| {
            let w = perturb(random_task_weights(&config, &method, &t, seed + 1), seed + 2, 5.0);
            (t, w)
        })
        .collect();
    Setup { config, method, shared, tasks }
}

impl Setup {
    fn upload(&self) -> MultiTaskModel {
        let tasks: Vec<(TaskSpec, &Weights)> = self.tasks.iter().map(|(t, w)| (t.clone(), w)).collect();
        MultiTaskModel::upload(gpu(), &self.config, self.method, &self.shared, &tasks).unwrap()
    }
}

/// `batch` sequences of length `seq`; sequence b has seq - 2b real tokens (at least 1).
fn encoder_batch(c: &BertConfig, batch: usize, seq: usize, seed: u32) -> EncoderBatch {
    let random = random_vec(batch * seq, seed, 1.0);
    let mut out = EncoderBatch { batch, seq, ids: vec![], type_ids: vec![], mask: vec![] };
    for b in 0..batch {
        let real = seq.saturating_sub(2 * b).max(1);
        for s in 0..seq {
            let is_real = s < real;
            let id = 1
                + (random[b * seq + s].abs() * (c.vocab_size - 1) as f32) as u32 % (c.vocab_size as u32 - 1);
            out.ids.push(if is_real { id } else { 0 });
            out.type_ids.push(u32::from(is_real && s >= real / 2));
            out.mask.push(if is_real { 1.0 } else { 0.0 });
        }
    }
    out
}

/// Targets of `task` for `batch` examples, and their weights (the last example masked).
fn targets(task: &TaskSpec, batch: usize, seed: u32) -> (Targets, Vec<f32>) {
    let r = random_vec(batch, seed, 1.0);
    let targets = if task.is_regression() {
        Targets::Scores(r.iter().map(|v| 5.0 * v.abs()).collect())
    } else {
        Targets::Classes(r.iter().map(|v| (v.abs() * 100.0) as u32 % task.num_labels as u32).collect())
    };
    let weights = (0..batch).map(|b| if b + 1 == batch && batch > 2 { 0.0 } else { 1.0 }).collect();
    (targets, weights)
}

/// What one GPU step produces.
struct Step {
    loss: f32,
    logits: Vec<f32>,
    shared: Weights,
    task: Weights,
    /// Every task's gradients after the step.
    all_tasks: Vec<Weights>,
}

/// One step of task `task` in a fresh bucket, forward and backward in one submit.
#[allow(clippy::too_many_arguments)]
fn gpu_step(
    model: &MultiTaskModel,
    acts: &TaskActivations,
    batch: &EncoderBatch,
    task: usize,
    targets: &Targets,
    weights: &[f32],
    dropout: Option<DropoutKey>,
) -> Step {
    let gpu = gpu();
    let inputs = BatchInputs::upload(gpu, &model.bert.config, batch).unwrap();
    let labels = HeadInputs::upload(gpu, targets, weights).unwrap();
    let mut rec = gpu.recorder();
    let loss = model.forward_backward(&mut rec, acts, &inputs, &labels, task, dropout).unwrap();
    rec.submit().unwrap();
    Step {
        loss: gpu.read::<f32>(loss).unwrap()[0],
        logits: gpu.read(&model.logits(acts, task).unwrap()).unwrap(),
        shared: model.bert.download_grads(gpu).unwrap(),
        task: model.download_task_grads(gpu, task).unwrap(),
        all_tasks: (0..model.tasks.len()).map(|t| model.download_task_grads(gpu, t).unwrap()).collect(),
    }
}

fn assert_grads(what: &str, got: &Weights, want: &Weights) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (name, want) in want {
        assert_eq!(got[name].shape, want.shape, "{what}: {name}");
        assert_close(&format!("{what}: d {name}"), &got[name].data, &want.data, GRAD_RTOL, GRAD_ATOL);
    }
}

/// GPU vs reference for one step of each task in turn, on the same model and buffers.
fn check(method: Method, batch: usize, seq: usize, dropout: Option<DropoutKey>, seed: u32) {
    let s = setup(method, seed);
    let model = s.upload();
    let acts = model.activations(gpu(), batch, seq).unwrap();
    let encoder = encoder_batch(&s.config, batch, seq, seed + 3);
    for (index, (task, task_weights)) in s.tasks.iter().enumerate() {
        let what = format!("{} {} {batch}x{seq} {dropout:?}", method.name(), task.name);
        let (targets, weights) = targets(task, batch, seed + 4 + index as u32);
        let got = gpu_step(&model, &acts, &encoder, index, &targets, &weights, dropout);
        let host = TaskBatch { encoder: &encoder, targets: &targets, weights: &weights };
        let want = reference::step(&s.config, method, &s.shared, task, task_weights, &host, dropout);
        let want_logits: Vec<f32> = want.logits.iter().map(|&v| v as f32).collect();
        assert_close(&format!("{what}: loss"), &[got.loss], &[want.loss as f32], OUT_RTOL, OUT_ATOL);
        assert_close(&format!("{what}: logits"), &got.logits, &want_logits, OUT_RTOL, OUT_ATOL);
        assert_grads(&format!("{what}: encoder"), &got.shared, &want.shared_grads);
        assert_grads(&format!("{what}: task"), &got.task, &want.task_grads);
        // The first step leaves the other task's gradients at their initial zeros.
        if index == 0 {
            for (name, grad) in &got.all_tasks[1] {
                assert!(grad.data.iter().all(|&v| v == 0.0), "{what}: {name} was written");
            }
        }
    }
}

const KEY: DropoutKey = DropoutKey::new(1234, 7);

#[test]
fn shared_matches_reference() {
    check(METHODS[0], 3, 7, None, 10);
    check(METHODS[0], 2, 5, Some(KEY), 20);
}

#[test]
fn pals_match_reference() {
    check(METHODS[1], 3, 7, None, 30);
    check(METHODS[1], 3, 7, Some(KEY), 40);
    check(METHODS[1], 2, 13, Some(DropoutKey::new(5, 0)), 50);
}

#[test]
fn low_rank_matches_reference() {
    check(METHODS[2], 3, 7, None, 60);
    check(METHODS[2], 2, 5, Some(KEY), 70);
}

#[test]
fn adapters_match_reference() {
    check(METHODS[3], 3, 7, None, 80);
    check(METHODS[3], 2, 5, Some(KEY), 90);
}

#[test]
fn top_attn_matches_reference() {
    check(METHODS[4], 3, 7, None, 140);
    check(METHODS[4], 3, 7, Some(KEY), 150);
    // The default for hidden 32: 12 heads of 1.
    let default = Method::default_for("top-attn", &tiny()).unwrap();
    assert_eq!(default, Method::TopAttn { dim: 12, heads: 12, blocks: 6 });
    check(default, 2, 13, Some(DropoutKey::new(5, 0)), 160);
}

/// One sequence of one token, one layer: PALs with one head of 4, and top-attn with one
/// block (an odd number: the backward's ping-pong ends on its other buffer).
#[test]
fn one_token_matches_reference() {
    one_token(Method::Pals { dim: 4, heads: 1 });
    one_token(Method::TopAttn { dim: 4, heads: 2, blocks: 1 });
}

fn one_token(method: Method) {
    let config = BertConfig::tiny(1, 8, 2);
    let task = TaskSpec::new("RTE", 2);
    let shared = perturb(random_weights(&config, 1), 1, 1.0);
    let task_weights = perturb(random_task_weights(&config, &method, &task, 2), 3, 5.0);
    let model =
        MultiTaskModel::upload(gpu(), &config, method, &shared, &[(task.clone(), &task_weights)]).unwrap();
    let acts = model.activations(gpu(), 1, 1).unwrap();
    let encoder = encoder_batch(&config, 1, 1, 4);
    let (targets, weights) = (Targets::Classes(vec![1]), vec![1.0]);
    let got = gpu_step(&model, &acts, &encoder, 0, &targets, &weights, Some(KEY));
    let host = TaskBatch { encoder: &encoder, targets: &targets, weights: &weights };
    let want = reference::step(&config, method, &shared, &task, &task_weights, &host, Some(KEY));
    let what = format!("1x1 {}", method.name());
    assert_close(&format!("{what}: loss"), &[got.loss], &[want.loss as f32], OUT_RTOL, OUT_ATOL);
    assert_grads(&format!("{what}: encoder"), &got.shared, &want.shared_grads);
    assert_grads(&format!("{what}: task"), &got.task, &want.task_grads);
}

/// A step of one task leaves the other's gradients (and everyone's parameters) as they were.
#[test]
fn other_tasks_are_untouched() {
    for method in [METHODS[1], METHODS[4]] {
        other_task_untouched(method);
    }
}

fn other_task_untouched(method: Method) {
    let gpu = gpu();
    let s = setup(method, 100);
    let model = s.upload();
    let acts = model.activations(gpu, 2, 5).unwrap();
    let encoder = encoder_batch(&s.config, 2, 5, 101);
    let specs = tasks();
    let (t0, w0) = targets(&specs[0], 2, 102);
    let (t1, w1) = targets(&specs[1], 2, 103);
    let after_1 = gpu_step(&model, &acts, &encoder, 1, &t1, &w1, Some(KEY));
    let after_0 = gpu_step(&model, &acts, &encoder, 0, &t0, &w0, Some(KEY));
    for (name, grad) in &after_1.task {
        assert_eq!(grad.data, after_0.all_tasks[1][name].data, "{name}");
    }
    assert_ne!(after_0.all_tasks[0], after_1.all_tasks[0]);
    for (index, (_, weights)) in s.tasks.iter().enumerate() {
        assert_eq!(&model.download_task_weights(gpu, index).unwrap(), weights);
    }
}

#[test]
fn steps_are_deterministic() {
    for method in METHODS {
        let s = setup(method, 110);
        let model = s.upload();
        let acts = model.activations(gpu(), 3, 7).unwrap();
        let encoder = encoder_batch(&s.config, 3, 7, 111);
        let (targets, weights) = targets(&s.tasks[0].0, 3, 112);
        let first = gpu_step(&model, &acts, &encoder, 0, &targets, &weights, Some(KEY));
        let second = gpu_step(&model, &acts, &encoder, 0, &targets, &weights, Some(KEY));
        let bits =
            |w: &Weights| w.values().flat_map(|t| t.data.iter().map(|v| v.to_bits())).collect::<Vec<_>>();
        assert_eq!(first.loss.to_bits(), second.loss.to_bits(), "{}", method.name());
        assert_eq!(bits(&first.shared), bits(&second.shared), "{}", method.name());
        assert_eq!(bits(&first.task), bits(&second.task), "{}", method.name());
    }
}

#[test]
fn shape_errors() {
    let gpu = gpu();
    let s = setup(METHODS[1], 120);
    let mut missing = s.tasks[0].1.clone();
    missing.remove("tasks.CoLA.pal.layer.1.key.bias");
    let error =
        MultiTaskModel::upload(gpu, &s.config, s.method, &s.shared, &[(s.tasks[0].0.clone(), &missing)])
            .err()
            .unwrap();
    assert!(
        matches!(error, ModelError::Weights { .. }) && error.to_string().contains("pal.layer.1.key.bias")
    );
    let bad = Method::Pals { dim: 10, heads: 6 };
    let error = MultiTaskModel::upload(gpu, &s.config, bad, &s.shared, &[]).err().unwrap();
    assert!(matches!(error, ModelError::Method { .. }), "{error}");
    let bad = Method::TopAttn { dim: 15, heads: 4, blocks: 6 };
    let error = MultiTaskModel::upload(gpu, &s.config, bad, &s.shared, &[]).err().unwrap();
    assert!(matches!(error, ModelError::Method { .. }), "{error}");
    let error = MultiTaskModel::upload(gpu, &s.config, Method::Separate, &s.shared, &[]).err().unwrap();
    assert!(error.to_string().contains("single-task 'shared' model"), "{error}");

    let model = s.upload();
    let acts = model.activations(gpu, 2, 5).unwrap();
    let inputs = BatchInputs::upload(gpu, &s.config, &encoder_batch(&s.config, 2, 5, 121)).unwrap();
    let labels = HeadInputs::upload(gpu, &Targets::Classes(vec![0, 1]), &[1.0, 1.0]).unwrap();
    let mut rec = gpu.recorder();
    let error = model.forward_backward(&mut rec, &acts, &inputs, &labels, 2, None).err().unwrap();
    assert!(matches!(error, GpuError::Shape { .. }), "{error}");
    let wrong = HeadInputs::upload(gpu, &Targets::Classes(vec![0, 1, 0]), &[1.0; 3]).unwrap();
    let error = model.forward_backward(&mut rec, &acts, &inputs, &wrong, 0, None).err().unwrap();
    assert!(matches!(error, GpuError::Shape { .. }), "{error}");
    let scores = HeadInputs::upload(gpu, &Targets::Scores(vec![0.0, 1.0]), &[1.0; 2]).unwrap();
    let error = model.forward_backward(&mut rec, &acts, &inputs, &scores, 0, None).err().unwrap();
    assert!(error.to_string().contains("scores"), "{error}");
    let other = setup(METHODS[2], 122).upload();
    let error = other.forward_backward(&mut rec, &acts, &inputs, &labels, 0, None).err().unwrap();
    assert!(error.to_string().contains("activations for Pals"), "{error}");
}

/// Every buffer a bucket allocates is in the plan, and the names and shapes are the
/// task_param_shapes' for the parameters.
#[test]
fn plans_match_allocation() {
    let gpu = gpu();
    for method in METHODS {
        let s = setup(method, 130);
        let model = s.upload();
        let acts = model.activations(gpu, 3, 7).unwrap();
        let plan = TaskActivations::plan(&s.config, &method, 2, 3, 7);
        assert_eq!(plan.len(), acts.all.len(), "{}", method.name());
        let planned: u64 =
            plan.iter().map(|(_, shape, dtype)| pals::model::memory::typed_bytes(shape, *dtype)).sum::<u64>()
                + acts.encoder.bytes();
        assert_eq!(planned, acts.bytes(), "{}", method.name());
        assert_eq!(Activations::plan(&s.config, 3, 7).len(), acts.encoder.all.len());
        for (index, module) in model.tasks.iter().enumerate() {
            let names: Vec<(String, Vec<usize>)> =
                module.params.named.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
            assert_eq!(names, task_param_shapes(&s.config, &method, &s.tasks[index].0));
        }
    }
}

/// An inference model (no gradients, forward-only buffers shared by the layers) gives the
/// training model's logits bit for bit, for every method and task, in less memory, and
/// refuses a backward.
#[test]
fn inference_matches_the_training_forward() {
    let gpu = gpu();
    for method in METHODS {
        let s = setup(method, 140);
        let tasks: Vec<(TaskSpec, &Weights)> = s.tasks.iter().map(|(t, w)| (t.clone(), w)).collect();
        let training = s.upload();
        let inference = MultiTaskModel::upload_inference(gpu, &s.config, method, &s.shared, &tasks).unwrap();
        let (train_acts, eval_acts) =
            (training.activations(gpu, 3, 9).unwrap(), inference.activations(gpu, 3, 9).unwrap());
        let inputs = BatchInputs::upload(gpu, &s.config, &encoder_batch(&s.config, 3, 9, 141)).unwrap();
        for task in 0..tasks.len() {
            let logits = |model: &MultiTaskModel, acts: &TaskActivations| {
                let mut rec = gpu.recorder();
                model.forward(&mut rec, acts, &inputs, task, None).unwrap();
                rec.submit().unwrap();
                gpu.read::<f32>(&model.logits(acts, task).unwrap()).unwrap()
            };
            let (want, got) = (logits(&training, &train_acts), logits(&inference, &eval_acts));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{} task {task}", method.name());
        }
        assert!(eval_acts.bytes() < train_acts.bytes(), "{}", method.name());
        let bucket = Bucket { batch: 3, seq: 9, training: false };
        let plan = TaskActivations::plan_for(&s.config, &method, 2, bucket);
        assert_eq!(plan.len(), eval_acts.all.len(), "{}", method.name());
        assert!(inference.bert.grads.is_none() && inference.tasks.iter().all(|t| t.grads.is_none()));
        let labels = HeadInputs::upload(gpu, &Targets::Classes(vec![0, 1, 0]), &[1.0; 3]).unwrap();
        let mut rec = gpu.recorder();
        let error =
            inference.forward_backward(&mut rec, &eval_acts, &inputs, &labels, 0, None).err().unwrap();
        assert!(error.to_string().contains("no gradients"), "{error}");
    }
}
