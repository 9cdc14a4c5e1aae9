//! Cross-entropy and MSE on the GPU against the CPU reference.
//! Tolerances: loss rtol 1e-5 / atol 1e-6; gradients rtol 1e-5 / atol 1e-7 (they are
//! O(1/B) and, for C = 1000, O(1e-3/B)).

mod common;

use common::{assert_close, gpu};
use pals::gpu::{Gpu, Tensor};
use pals::kernels::loss;
use pals::reference::{self, random_vec};

const BATCHES: &[usize] = &[1, 7, 33];
const CLASSES: &[usize] = &[1, 2, 3, 1000];

fn labels_for(batch: usize, classes: usize, seed: u32) -> Vec<u32> {
    (0..batch as u32).map(|b| reference::rng::rng_u32(seed, 1, b) % classes as u32).collect()
}

/// Every third example masked, and the last one (a padding example in a partial batch).
fn mask(batch: usize) -> Vec<f32> {
    (0..batch).map(|b| if b % 3 == 2 || (batch > 1 && b == batch - 1) { 0.0 } else { 1.0 }).collect()
}

struct CeRun {
    loss: Vec<f32>,
    dlogits: Vec<f32>,
}

fn run_cross_entropy(
    gpu: &Gpu,
    logits: &[f32],
    labels: &[u32],
    weights: &[f32],
    classes: usize,
    grad_scale: f32,
) -> CeRun {
    let batch = labels.len();
    let logits = gpu.upload("logits", &[batch, classes], logits).unwrap();
    let labels = gpu.upload("labels", &[batch], labels).unwrap();
    let weights = gpu.upload("weights", &[batch], weights).unwrap();
    let loss_t = gpu.zeros("loss", &[1]).unwrap();
    let dlogits = gpu.zeros("dlogits", &[batch, classes]).unwrap();
    let grad_scale = gpu.upload("grad_scale", &[1], &[grad_scale]).unwrap();
    let mut rec = gpu.recorder();
    loss::cross_entropy(&mut rec, &logits, &labels, &weights, &loss_t, &dlogits, &grad_scale).unwrap();
    rec.submit().unwrap();
    CeRun { loss: gpu.read::<f32>(&loss_t).unwrap(), dlogits: gpu.read::<f32>(&dlogits).unwrap() }
}

fn check_cross_entropy(what: &str, logits: &[f32], labels: &[u32], weights: &[f32], c: usize) {
    let gpu = gpu();
    let grad_scale = 0.5;
    let got = run_cross_entropy(gpu, logits, labels, weights, c, grad_scale);
    let (want_loss, want_grad) = reference::loss::cross_entropy(logits, labels, weights, c, grad_scale);
    assert_close(&format!("{what} loss"), &got.loss, &[want_loss], 1e-5, 1e-6);
    assert_close(&format!("{what} dlogits"), &got.dlogits, &want_grad, 1e-5, 1e-7);
}

#[test]
fn cross_entropy_matches_reference() {
    for &b in BATCHES {
        for &c in CLASSES {
            let logits = random_vec(b * c, (b * 31 + c) as u32, 4.0);
            let labels = labels_for(b, c, c as u32);
            check_cross_entropy(&format!("B={b} C={c}"), &logits, &labels, &vec![1.0; b], c);
            let masked = mask(b);
            check_cross_entropy(&format!("masked B={b} C={c}"), &logits, &labels, &masked, c);
        }
    }
}

#[test]
fn cross_entropy_large_logits_and_bad_labels() {
    // Large logits must not overflow; a label out of range counts as masked; masked rows
    // with infinite logits still give exact zeros.
    let (b, c) = (5, 3);
    let mut logits = random_vec(b * c, 77, 80.0);
    logits[4] = f32::INFINITY;
    let labels = [0, 2, 1, 5, 1];
    let weights = [1.0, 0.0, 1.0, 1.0, 1.0];
    let got = run_cross_entropy(gpu(), &logits, &labels, &weights, c, 1.0);
    assert!(got.dlogits[3..6].iter().all(|&g| g == 0.0));
    assert!(got.dlogits[9..12].iter().all(|&g| g == 0.0));
    check_cross_entropy("edge cases", &logits, &labels, &weights, c);
}

#[test]
fn all_masked_batch_gives_zeros() {
    let gpu = gpu();
    let (b, c) = (7, 3);
    let logits = random_vec(b * c, 5, 4.0);
    let got = run_cross_entropy(gpu, &logits, &labels_for(b, c, 1), &[0.0; 7], c, 1.0);
    assert_eq!(got.loss, [0.0]);
    assert!(got.dlogits.iter().all(|&g| g == 0.0), "{:?}", got.dlogits);
    let (loss, dpred) = run_mse(gpu, &random_vec(b, 6, 1.0), &random_vec(b, 7, 1.0), &[0.0; 7]);
    assert_eq!(loss, [0.0]);
    assert!(dpred.iter().all(|&g| g == 0.0));
}

fn run_mse(gpu: &Gpu, pred: &[f32], targets: &[f32], weights: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let b = pred.len();
    let pred: Tensor = gpu.upload("pred", &[b, 1], pred).unwrap();
    let targets = gpu.upload("targets", &[b], targets).unwrap();
    let weights = gpu.upload("weights", &[b], weights).unwrap();
    let loss_t = gpu.zeros("loss", &[1]).unwrap();
    let dpred = gpu.zeros("dpred", &[b, 1]).unwrap();
    let grad_scale = gpu.upload("grad_scale", &[1], &[2.0f32]).unwrap();
    let mut rec = gpu.recorder();
    loss::mse(&mut rec, &pred, &targets, &weights, &loss_t, &dpred, &grad_scale).unwrap();
    rec.submit().unwrap();
    (gpu.read::<f32>(&loss_t).unwrap(), gpu.read::<f32>(&dpred).unwrap())
}

#[test]
fn mse_matches_reference() {
    let gpu = gpu();
    for &b in &[1usize, 7, 33, 600] {
        let pred = random_vec(b, b as u32, 3.0);
        let targets = random_vec(b, b as u32 + 100, 3.0);
        for weights in [vec![1.0; b], mask(b)] {
            let (got_loss, got_grad) = run_mse(gpu, &pred, &targets, &weights);
            let (want_loss, want_grad) = reference::loss::mse(&pred, &targets, &weights, 2.0);
            assert_close(&format!("mse B={b}"), &got_loss, &[want_loss], 1e-5, 1e-6);
            assert_close(&format!("mse' B={b}"), &got_grad, &want_grad, 1e-5, 1e-7);
        }
    }
}

#[test]
fn losses_are_bit_identical_across_runs() {
    let gpu = gpu();
    let (b, c) = (33, 1000);
    let logits = random_vec(b * c, 9, 4.0);
    let labels = labels_for(b, c, 2);
    let weights = mask(b);
    let first = run_cross_entropy(gpu, &logits, &labels, &weights, c, 1.0);
    let second = run_cross_entropy(gpu, &logits, &labels, &weights, c, 1.0);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first.loss), bits(&second.loss));
    assert_eq!(bits(&first.dlogits), bits(&second.dlogits));
    let pred = random_vec(600, 1, 1.0);
    let targets = random_vec(600, 2, 1.0);
    let one = run_mse(gpu, &pred, &targets, &mask(600));
    let two = run_mse(gpu, &pred, &targets, &mask(600));
    assert_eq!(bits(&one.0), bits(&two.0));
    assert_eq!(bits(&one.1), bits(&two.1));
}

#[test]
fn shape_mismatches_are_errors() {
    let gpu = gpu();
    let logits = gpu.zeros("logits", &[4, 3]).unwrap();
    let labels = gpu.zeros("labels", &[5]).unwrap();
    let weights = gpu.zeros("weights", &[4]).unwrap();
    let loss_t = gpu.zeros("loss", &[1]).unwrap();
    let dlogits = gpu.zeros("dlogits", &[4, 3]).unwrap();
    let one = gpu.upload("one", &[1], &[1.0f32]).unwrap();
    let mut rec = gpu.recorder();
    let error = loss::cross_entropy(&mut rec, &logits, &labels, &weights, &loss_t, &dlogits, &one)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'labels'") && error.contains("[5]"), "{error}");
    let flat = gpu.zeros("flat", &[12]).unwrap();
    let error = loss::cross_entropy(&mut rec, &flat, &labels, &weights, &loss_t, &dlogits, &one)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'flat'"), "{error}");
    let error =
        loss::mse(&mut rec, &weights, &labels, &weights, &loss_t, &weights, &one).unwrap_err().to_string();
    assert!(error.contains("'weights'") && error.contains("[4]"), "{error}");
    let error = loss::cross_entropy(&mut rec, &logits, &weights, &weights, &loss_t, &dlogits, &weights)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'weights'"), "a grad_scale of 4 elements: {error}");
}
