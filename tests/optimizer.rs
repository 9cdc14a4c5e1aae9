//! Gradient norms, clip coefficients and Adam on the GPU against the CPU reference.
//! Tolerances: rtol 1e-5 / atol 1e-6 for everything (norms, factors, param, m, v).

mod common;

use common::{assert_close, gpu};
use pals::gpu::{Gpu, Recorder, Tensor};
use pals::kernels::optimizer::{self, AdamConfig, ClipMode, NORM_PARTIALS};
use pals::reference::{self, random_vec};

const SIZES: &[usize] = &[1, 1000, 100_003];

fn as_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Squared norms of each gradient, and the clip factors, computed on the GPU.
fn gpu_norms_and_coef(gpu: &Gpu, grads: &[Tensor], max_norm: f32, mode: ClipMode) -> (Vec<f32>, Tensor) {
    let partials = gpu.zeros("partials", &[NORM_PARTIALS]).unwrap();
    let norms = gpu.zeros("norms", &[grads.len()]).unwrap();
    let coef = gpu.zeros("coef", &[grads.len() + 1]).unwrap();
    let mut rec = gpu.recorder();
    for (slot, grad) in grads.iter().enumerate() {
        optimizer::sum_squares(&mut rec, grad, &partials, &norms, slot as u32).unwrap();
    }
    optimizer::clip_coefficients(&mut rec, &norms, &coef, max_norm, mode).unwrap();
    rec.submit().unwrap();
    (gpu.read::<f32>(&norms).unwrap(), coef)
}

#[test]
fn sum_squares_matches_reference() {
    let gpu = gpu();
    // 1_500_007 elements fill all NORM_PARTIALS workgroups with several loads a thread.
    let sizes = [1, 7, 1000, 100_003, 1_500_007];
    let hosts: Vec<Vec<f32>> = sizes.iter().map(|&n| random_vec(n, n as u32, 2.0)).collect();
    let grads: Vec<Tensor> = hosts.iter().map(|h| gpu.upload("grad", &[h.len()], h).unwrap()).collect();
    let (norms, _) = gpu_norms_and_coef(gpu, &grads, 1.0, ClipMode::None);
    let want: Vec<f64> = hosts.iter().map(|h| reference::optimizer::sum_squares(h)).collect();
    assert_close("sum of squares", &norms, &as_f32(&want), 1e-5, 1e-6);
    let (again, _) = gpu_norms_and_coef(gpu, &grads, 1.0, ClipMode::None);
    assert_eq!(bits(&norms), bits(&again), "sum of squares not deterministic");
}

#[test]
fn clip_coefficients_match_reference() {
    let gpu = gpu();
    let hosts: Vec<Vec<f32>> = SIZES.iter().map(|&n| random_vec(n, 3 * n as u32, 0.1)).collect();
    let grads: Vec<Tensor> = hosts.iter().map(|h| gpu.upload("grad", &[h.len()], h).unwrap()).collect();
    let norms: Vec<f64> = hosts.iter().map(|h| reference::optimizer::sum_squares(h)).collect();
    // Norms are about 0.058, 1.8 and 18: 1.0 clips two tensors (and the global norm),
    // 100 clips nothing.
    for mode in [ClipMode::None, ClipMode::Global, ClipMode::PerTensor] {
        for max_norm in [1.0, 100.0] {
            let (_, coef) = gpu_norms_and_coef(gpu, &grads, max_norm, mode);
            let got = gpu.read::<f32>(&coef).unwrap();
            let want = reference::optimizer::clip_coefficients(&norms, max_norm as f64, mode);
            let what = format!("coef {mode:?} max_norm {max_norm}");
            assert_close(&what, &got, &as_f32(&want), 1e-5, 1e-6);
            let clipped = got[..3].iter().filter(|&&c| c < 1.0).count();
            let expected = match (mode, max_norm == 1.0) {
                (ClipMode::Global, true) => 3,
                (ClipMode::PerTensor, true) => 2,
                _ => 0,
            };
            assert_eq!(clipped, expected, "{what}: {got:?}");
        }
    }
}

/// Host copies of one parameter tensor's state.
struct State {
    param: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

#[test]
fn three_adam_steps_match_reference() {
    let gpu = gpu();
    for cfg in [AdamConfig::adamw(), AdamConfig::bert_adam()] {
        for &n in SIZES {
            for weight_decay in [0.0, 0.01] {
                let what = format!("n={n} wd={weight_decay} {cfg:?}");
                let mut host = State { param: random_vec(n, 1, 1.0), m: vec![0.0; n], v: vec![0.0; n] };
                let param = gpu.upload("param", &[n], &host.param).unwrap();
                let m = gpu.zeros("m", &[n]).unwrap();
                let v = gpu.zeros("v", &[n]).unwrap();
                let grad = gpu.zeros("grad", &[n]).unwrap();
                // slot 1 carries the factor 0.75; slot 0 must be ignored.
                let coef = gpu.upload("coef", &[3], &[9.0f32, 0.75, 0.0]).unwrap();
                for step in 1..=3u32 {
                    let g = random_vec(n, 10 + step, 0.5);
                    gpu.write(&grad, &g).unwrap();
                    let lr = 1e-3 * step as f32;
                    let mut rec = gpu.recorder();
                    optimizer::adam_step(
                        &mut rec,
                        &param,
                        &grad,
                        &m,
                        &v,
                        &coef,
                        1,
                        lr,
                        weight_decay,
                        step,
                        &cfg,
                    )
                    .unwrap();
                    rec.submit().unwrap();
                    reference::optimizer::adam_step(
                        &mut host.param,
                        &g,
                        &mut host.m,
                        &mut host.v,
                        0.75,
                        lr,
                        weight_decay,
                        step,
                        &cfg,
                    );
                    let what = format!("{what} step {step}");
                    let got_m = gpu.read::<f32>(&m).unwrap();
                    let got_v = gpu.read::<f32>(&v).unwrap();
                    assert_close(&format!("m {what}"), &got_m, &host.m, 1e-5, 1e-6);
                    assert_close(&format!("v {what}"), &got_v, &host.v, 1e-5, 1e-6);
                    let got_param = gpu.read::<f32>(&param).unwrap();
                    assert_close(&format!("param {what}"), &got_param, &host.param, 1e-5, 1e-6);
                }
            }
        }
    }
}

/// Norms, clipping and the update of three tensors in one submit, as in a training step.
fn clipped_step(gpu: &Gpu, mode: ClipMode) -> Vec<Vec<f32>> {
    let grads_host: Vec<Vec<f32>> = SIZES.iter().map(|&n| random_vec(n, n as u32, 0.1)).collect();
    let params_host: Vec<Vec<f32>> = SIZES.iter().map(|&n| random_vec(n, 5, 1.0)).collect();
    let grads: Vec<Tensor> = grads_host.iter().map(|g| gpu.upload("grad", &[g.len()], g).unwrap()).collect();
    let params: Vec<Tensor> =
        params_host.iter().map(|p| gpu.upload("param", &[p.len()], p).unwrap()).collect();
    let partials = gpu.zeros("partials", &[NORM_PARTIALS]).unwrap();
    let norms = gpu.zeros("norms", &[SIZES.len()]).unwrap();
    let coef = gpu.zeros("coef", &[SIZES.len() + 1]).unwrap();
    let cfg = AdamConfig::adamw();
    let mut rec = gpu.recorder();
    let mut moments = Vec::new();
    for (slot, grad) in grads.iter().enumerate() {
        optimizer::sum_squares(&mut rec, grad, &partials, &norms, slot as u32).unwrap();
    }
    optimizer::clip_coefficients(&mut rec, &norms, &coef, 1.0, mode).unwrap();
    for (slot, (param, grad)) in params.iter().zip(&grads).enumerate() {
        let m = gpu.zeros("m", &[param.len()]).unwrap();
        let v = gpu.zeros("v", &[param.len()]).unwrap();
        // Two steps so that the clip factor does not cancel out of m̂ / √v̂.
        for step in 1..=2 {
            optimizer::adam_step(&mut rec, param, grad, &m, &v, &coef, slot as u32, 0.01, 0.01, step, &cfg)
                .unwrap();
        }
        moments.push(m);
    }
    rec.submit().unwrap();

    let norms_host: Vec<f64> = grads_host.iter().map(|g| reference::optimizer::sum_squares(g)).collect();
    let factors = reference::optimizer::clip_coefficients(&norms_host, 1.0, mode);
    let mut results = Vec::new();
    for (slot, (mut p, g)) in params_host.into_iter().zip(&grads_host).enumerate() {
        let (mut m, mut v) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        for step in 1..=2 {
            reference::optimizer::adam_step(&mut p, g, &mut m, &mut v, factors[slot], 0.01, 0.01, step, &cfg);
        }
        let what = format!("clipped step {mode:?} slot {slot}");
        let got_m = gpu.read::<f32>(&moments[slot]).unwrap();
        assert_close(&format!("m {what}"), &got_m, &m, 1e-5, 1e-6);
        let got = gpu.read::<f32>(&params[slot]).unwrap();
        assert_close(&format!("param {what}"), &got, &p, 1e-5, 1e-6);
        results.push(got);
    }
    results
}

#[test]
fn clipped_training_step_matches_reference_and_is_deterministic() {
    let gpu = gpu();
    for mode in [ClipMode::Global, ClipMode::PerTensor, ClipMode::None] {
        let first = clipped_step(gpu, mode);
        let second = clipped_step(gpu, mode);
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(bits(a), bits(b), "{mode:?} step not deterministic");
        }
    }
}

#[test]
fn shape_mismatches_are_errors() {
    let gpu = gpu();
    let param = gpu.zeros("param", &[10]).unwrap();
    let short = gpu.zeros("short", &[9]).unwrap();
    let coef = gpu.zeros("coef", &[3]).unwrap();
    let mut rec = gpu.recorder();
    let cfg = AdamConfig::default();
    let adam = |rec: &mut Recorder, grad: &Tensor, slot, step| {
        optimizer::adam_step(rec, &param, grad, &param, &param, &coef, slot, 0.1, 0.0, step, &cfg)
            .unwrap_err()
            .to_string()
    };
    let error = adam(&mut rec, &short, 0, 1);
    assert!(error.contains("'short'") && error.contains("[9]"), "{error}");
    let error = adam(&mut rec, &param, 3, 1);
    assert!(error.contains("slot 3") && error.contains("'coef'"), "{error}");
    let error = adam(&mut rec, &param, 0, 0);
    assert!(error.contains("step"), "{error}");

    let norms = gpu.zeros("norms", &[2]).unwrap();
    let error = optimizer::clip_coefficients(&mut rec, &norms, &norms, 1.0, ClipMode::Global)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'norms'"), "{error}");
    let error = optimizer::sum_squares(&mut rec, &param, &short, &norms, 0).unwrap_err().to_string();
    assert!(error.contains("'short'") && error.contains("partials"), "{error}");
    let partials = gpu.zeros("partials", &[NORM_PARTIALS]).unwrap();
    let error = optimizer::sum_squares(&mut rec, &param, &partials, &norms, 2).unwrap_err().to_string();
    assert!(error.contains("slot 2"), "{error}");
    assert!(rec.is_empty());
}
