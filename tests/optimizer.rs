//! Gradient norms, clip coefficients and Adam on the GPU against the CPU reference.
//! Tolerances: rtol 1e-5 / atol 1e-6 for everything (norms, factors, param, m, v).

mod common;

use common::{assert_close, assert_rounded_f16, gpu};
use pals::gpu::{ElementType, Gpu, Recorder, Tensor};
use pals::kernels::optimizer::{
    self, AdamConfig, AdamSteps, ClipMode, LossScaling, NORM_PARTIALS, bias_correction_table,
};
use pals::reference::{self, random_vec};

const SIZES: &[usize] = &[1, 1000, 100_003];

fn as_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The scaler state [scale, growth] of an unscaled step.
fn unscaled(gpu: &Gpu) -> Tensor {
    gpu.upload("scaler", &[2], &[1.0f32, 0.0]).unwrap()
}

/// Squared norms of each gradient, and the clip factors, computed on the GPU.
fn gpu_norms_and_coef(gpu: &Gpu, grads: &[Tensor], max_norm: f32, mode: ClipMode) -> (Vec<f32>, Tensor) {
    scaled_norms_and_coef(gpu, grads, &unscaled(gpu), max_norm, mode)
}

/// `gpu_norms_and_coef` of gradients scaled by scaler[0], with the found flag raised on
/// overflow.
fn scaled_norms_and_coef(
    gpu: &Gpu,
    grads: &[Tensor],
    scaler: &Tensor,
    max_norm: f32,
    mode: ClipMode,
) -> (Vec<f32>, Tensor) {
    let partials = gpu.zeros("partials", &[NORM_PARTIALS]).unwrap();
    let norms = gpu.zeros("norms", &[grads.len()]).unwrap();
    let coef = gpu.zeros("coef", &[grads.len() + 2]).unwrap();
    let mut rec = gpu.recorder();
    for (slot, grad) in grads.iter().enumerate() {
        optimizer::sum_squares(&mut rec, grad, &partials, &norms, slot as u32).unwrap();
    }
    optimizer::clip_coefficients(&mut rec, &norms, &coef, scaler, max_norm, mode, true).unwrap();
    rec.submit().unwrap();
    (gpu.read::<f32>(&norms).unwrap(), coef)
}

/// Step counts and the bias-correction table of `cfg` on the GPU.
struct Counts {
    counts: Tensor,
    corrections: Tensor,
    pairs: u32,
}

/// One AdamW step of one tensor ([param, grad, m, v]), with the factor in coef[slot] and
/// the learning rate and weight decay given, in a submit of its own.
fn submit_adam_step(
    gpu: &Gpu,
    [param, grad, m, v]: [&Tensor; 4],
    (coef, slot): (&Tensor, u32),
    (lr, weight_decay): (f32, f32),
    steps: &AdamSteps,
    cfg: &AdamConfig,
    copy: Option<&Tensor>,
) {
    let mut rec = gpu.recorder();
    optimizer::adam_step(&mut rec, param, grad, m, v, coef, slot, lr, weight_decay, steps, cfg, copy)
        .unwrap();
    rec.submit().unwrap();
}

impl Counts {
    fn new(gpu: &Gpu, tensors: usize, cfg: &AdamConfig) -> Counts {
        let table = bias_correction_table(cfg).unwrap();
        let corrections = match table.is_empty() {
            true => gpu.zeros("corrections", &[1]).unwrap(),
            false => gpu.upload("corrections", &[table.len()], &table).unwrap(),
        };
        let counts = gpu.zeros("counts", &[tensors]).unwrap();
        Counts { counts, corrections, pairs: (table.len() / 2) as u32 }
    }

    fn at(&self, index: u32) -> AdamSteps<'_> {
        AdamSteps { counts: &self.counts, index, corrections: &self.corrections, pairs: self.pairs }
    }
}

#[test]
fn sum_squares_matches_reference() {
    let gpu = gpu();
    // 1_500_007 elements fill all NORM_PARTIALS workgroups with several loads a thread on a
    // GPU; CPU adapters (256 elements a thread at least) spread them over 23 workgroups.
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
            let mut want = reference::optimizer::clip_coefficients(&norms, max_norm as f64, mode);
            want.push(0.0); // found: nothing overflowed
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
                // slot 1 carries the factor 0.75; slot 0 must be ignored; the last is found.
                let coef = gpu.upload("coef", &[3], &[9.0f32, 0.75, 0.0]).unwrap();
                // The tensor's count at index 1: the one at 0 must be ignored.
                let counts = Counts::new(gpu, 2, &cfg);
                // The f16 copy written in the same pass (a variant of the kernel).
                let half = gpu.zeros_of("param f16", &[n], ElementType::F16).unwrap();
                for step in 1..=3u32 {
                    gpu.write(&counts.counts, &[7u32, step - 1]).unwrap();
                    let g = random_vec(n, 10 + step, 0.5);
                    gpu.write(&grad, &g).unwrap();
                    let lr = 1e-3 * step as f32;
                    let copy = (step != 2).then_some(&half);
                    let state = [&param, &grad, &m, &v];
                    submit_adam_step(gpu, state, (&coef, 1), (lr, weight_decay), &counts.at(1), &cfg, copy);
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
                    if step != 2 {
                        // The copy is the f32 result rounded once to f16.
                        let copy = gpu.read_f16(&half).unwrap();
                        assert_rounded_f16(&format!("f16 copy {what}"), &copy, &got_param);
                    }
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
    let coef = gpu.zeros("coef", &[SIZES.len() + 2]).unwrap();
    let cfg = AdamConfig::adamw();
    let counts = Counts::new(gpu, SIZES.len(), &cfg);
    let ids = gpu.upload("ids", &[SIZES.len()], &[0u32, 1, 2]).unwrap();
    let scaler = unscaled(gpu);
    let record = gpu.zeros("record", &[2]).unwrap();
    let mut rec = gpu.recorder();
    let mut moments = Vec::new();
    for (slot, grad) in grads.iter().enumerate() {
        optimizer::sum_squares(&mut rec, grad, &partials, &norms, slot as u32).unwrap();
    }
    optimizer::clip_coefficients(&mut rec, &norms, &coef, &scaler, 1.0, mode, false).unwrap();
    let ms: Vec<(Tensor, Tensor)> = params
        .iter()
        .map(|p| (gpu.zeros("m", &[p.len()]).unwrap(), gpu.zeros("v", &[p.len()]).unwrap()))
        .collect();
    // Two steps so that the clip factor does not cancel out of m̂ / √v̂.
    for _ in 1..=2 {
        for (slot, ((param, grad), (m, v))) in params.iter().zip(&grads).zip(&ms).enumerate() {
            let steps = counts.at(slot as u32);
            optimizer::adam_step(
                &mut rec,
                param,
                grad,
                m,
                v,
                &coef,
                slot as u32,
                0.01,
                0.01,
                &steps,
                &cfg,
                None,
            )
            .unwrap();
        }
        optimizer::update_scaler(&mut rec, &coef, &ids, &counts.counts, &scaler, &record, 0, 1, None)
            .unwrap();
    }
    moments.extend(ms.into_iter().map(|(m, _)| m));
    rec.submit().unwrap();
    assert_eq!(gpu.read::<u32>(&counts.counts).unwrap(), [2, 2, 2], "each tensor counted its 2 steps");
    assert_eq!(gpu.read::<f32>(&record).unwrap(), [1.0, 0.0], "scale 1, not skipped");

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
    let counts = Counts::new(gpu, 1, &cfg);
    let adam = |rec: &mut Recorder, grad: &Tensor, slot, index, copy: Option<&Tensor>| {
        let steps = counts.at(index);
        optimizer::adam_step(rec, &param, grad, &param, &param, &coef, slot, 0.1, 0.0, &steps, &cfg, copy)
            .unwrap_err()
            .to_string()
    };
    let error = adam(&mut rec, &short, 0, 0, None);
    assert!(error.contains("'short'") && error.contains("[9]"), "{error}");
    let error = adam(&mut rec, &param, 3, 0, None);
    assert!(error.contains("slot 3") && error.contains("'coef'"), "{error}");
    let error = adam(&mut rec, &param, 0, 1, None);
    assert!(error.contains("slot 1") && error.contains("'counts'"), "{error}");
    let error = adam(&mut rec, &param, 0, 0, Some(&short));
    assert!(error.contains("'short'") && error.contains("F32"), "an f32 tensor as the f16 copy: {error}");
    let half_short = gpu.zeros_of("half short", &[9], ElementType::F16).unwrap();
    let error = adam(&mut rec, &param, 0, 0, Some(&half_short));
    assert!(error.contains("'half short'") && error.contains("9"), "{error}");

    let norms = gpu.zeros("norms", &[2]).unwrap();
    let scaler = unscaled(gpu);
    let error = optimizer::clip_coefficients(&mut rec, &norms, &norms, &scaler, 1.0, ClipMode::Global, false)
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

#[test]
fn scaled_gradients_clip_to_the_unscaled_factors_bit_for_bit() {
    let gpu = gpu();
    let hosts: Vec<Vec<f32>> = SIZES.iter().map(|&n| random_vec(n, 3 * n as u32, 0.1)).collect();
    let grads: Vec<Tensor> = hosts.iter().map(|h| gpu.upload("grad", &[h.len()], h).unwrap()).collect();
    let scale = 65536.0f32;
    let scaled: Vec<Tensor> = hosts
        .iter()
        .map(|h| {
            let s: Vec<f32> = h.iter().map(|&g| g * scale).collect();
            gpu.upload("scaled grad", &[s.len()], &s).unwrap()
        })
        .collect();
    let scaler = gpu.upload("scaler", &[2], &[scale, 0.0]).unwrap();
    // A power-of-two scale commutes with every rounding: the factors that unscale are the
    // plain factors over the scale, exactly.
    for mode in [ClipMode::None, ClipMode::Global, ClipMode::PerTensor] {
        let (_, plain) = gpu_norms_and_coef(gpu, &grads, 1.0, mode);
        let (_, unscaling) = scaled_norms_and_coef(gpu, &scaled, &scaler, 1.0, mode);
        let plain = gpu.read::<f32>(&plain).unwrap();
        let mut got = gpu.read::<f32>(&unscaling).unwrap();
        let t = SIZES.len();
        for factor in &mut got[..t] {
            *factor *= scale;
        }
        assert_eq!(bits(&got), bits(&plain), "{mode:?}: factors × scale, global norm, found");
    }
}

#[test]
fn an_inf_or_nan_gradient_raises_found_only_with_scaling() {
    let gpu = gpu();
    for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let mut host = random_vec(1000, 4, 0.1);
        host[517] = bad;
        let grads = [
            gpu.upload("grad", &[1000], &host).unwrap(),
            gpu.upload("ok", &[7], &random_vec(7, 5, 0.1)).unwrap(),
        ];
        let scaler = unscaled(gpu);
        let (_, coef) = scaled_norms_and_coef(gpu, &grads, &scaler, 1.0, ClipMode::Global);
        assert_eq!(gpu.read::<f32>(&coef).unwrap()[3], 1.0, "{bad}: found with scaling");
        let partials = gpu.zeros("partials", &[NORM_PARTIALS]).unwrap();
        let norms = gpu.zeros("norms", &[2]).unwrap();
        let mut rec = gpu.recorder();
        for (slot, grad) in grads.iter().enumerate() {
            optimizer::sum_squares(&mut rec, grad, &partials, &norms, slot as u32).unwrap();
        }
        optimizer::clip_coefficients(&mut rec, &norms, &coef, &scaler, 1.0, ClipMode::Global, false).unwrap();
        rec.submit().unwrap();
        assert_eq!(gpu.read::<f32>(&coef).unwrap()[3], 0.0, "{bad}: never found without scaling");
    }
}

/// Two tensors through `Optimizer` with loss scaling (start 1024, growth every 3 clean
/// steps): the test multiplies the gradients by the scale as the loss backward would.
/// `bad[i]` puts that value into step i's first gradient.
struct Scaled {
    host: Vec<State>,
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    optimizer: pals::train::optim::Optimizer,
    record: Tensor,
}

const NAMES: [&str; 2] = ["encoder.weight", "head.bias"];

impl Scaled {
    fn new(gpu: &Gpu) -> Scaled {
        let sizes = [1000, 7];
        let host: Vec<State> = sizes
            .iter()
            .map(|&n| State { param: random_vec(n, n as u32, 1.0), m: vec![0.0; n], v: vec![0.0; n] })
            .collect();
        let params = host.iter().map(|s| gpu.upload("param", &[s.param.len()], &s.param).unwrap()).collect();
        let grads = sizes.iter().map(|&n| gpu.zeros("grad", &[n]).unwrap()).collect();
        let named: Vec<(String, usize)> = NAMES.iter().zip(sizes).map(|(n, s)| (n.to_string(), s)).collect();
        let settings = pals::train::optim::OptimizerSettings {
            scaling: Some(LossScaling { init_scale: 1024.0, growth_interval: 3 }),
            ..Default::default()
        };
        let optimizer = pals::train::optim::Optimizer::new(gpu, &named, settings).unwrap();
        Scaled { host, params, grads, optimizer, record: gpu.zeros("record", &[2]).unwrap() }
    }

    /// One step at this scale with gradients `grads` (unscaled); returns (scale used, skipped).
    fn step(&mut self, gpu: &Gpu, grads: &[Vec<f32>], scale: f32) -> (f32, bool) {
        for (tensor, g) in self.grads.iter().zip(grads) {
            let scaled: Vec<f32> = g.iter().map(|&x| x * scale).collect();
            gpu.write(tensor, &scaled).unwrap();
        }
        let params: Vec<(&str, &Tensor, &Tensor)> =
            NAMES.iter().zip(&self.params).zip(&self.grads).map(|((n, p), g)| (*n, p, g)).collect();
        let record = pals::train::optim::ScaleRecord { record: &self.record, slot: 0, stride: 1 };
        let mut rec = gpu.recorder();
        self.optimizer.step(&mut rec, &params, 1e-2, &record).unwrap();
        rec.submit().unwrap();
        let record = gpu.read::<f32>(&self.record).unwrap();
        (record[0], record[1] != 0.0)
    }

    /// The reference's step `step` (counting only updates) on the host copies.
    fn reference_step(&mut self, grads: &[Vec<f32>], step: u32) {
        let norms: Vec<f64> = grads.iter().map(|g| reference::optimizer::sum_squares(g)).collect();
        let factors = reference::optimizer::clip_coefficients(&norms, 1.0, ClipMode::Global);
        let cfg = AdamConfig::adamw();
        for (slot, (s, g)) in self.host.iter_mut().zip(grads).enumerate() {
            let decay = if pals::train::optim::decays(NAMES[slot]) { 0.01 } else { 0.0 };
            let (p, m, v) = (&mut s.param, &mut s.m, &mut s.v);
            reference::optimizer::adam_step(p, g, m, v, factors[slot], 1e-2, decay, step, &cfg);
        }
    }
}

#[test]
fn an_overflowing_step_is_skipped_halves_the_scale_and_is_not_counted() {
    let gpu = gpu();
    let mut run = Scaled::new(gpu);
    let grads = |seed: u32| vec![random_vec(1000, seed, 0.5), random_vec(7, seed + 1, 0.5)];
    // Steps: clean, inf, clean, clean, NaN, clean × 3. The scale: 1024, halved to 512 by
    // the inf, 256 by the NaN, then three clean steps double it to 512.
    let plan: [(Option<f32>, f32); 8] = [
        (None, 1024.0),
        (Some(f32::INFINITY), 1024.0),
        (None, 512.0),
        (None, 512.0),
        (Some(f32::NAN), 512.0),
        (None, 256.0),
        (None, 256.0),
        (None, 256.0),
    ];
    let mut updates = 0;
    for (i, &(bad, scale)) in plan.iter().enumerate() {
        let mut g = grads(20 + i as u32);
        if let Some(value) = bad {
            g[0][333] = value;
        }
        let before: Vec<Vec<u32>> = run.params.iter().map(|p| bits(&gpu.read::<f32>(p).unwrap())).collect();
        let (moments, _) = run.optimizer.download(gpu).unwrap();
        let (used, skipped) = run.step(gpu, &g, scale);
        assert_eq!((used, skipped), (scale, bad.is_some()), "step {i}: scale used, skipped");
        if skipped {
            for (p, b) in run.params.iter().zip(&before) {
                assert_eq!(
                    &bits(&gpu.read::<f32>(p).unwrap()),
                    b,
                    "step {i}: a skipped step changed a parameter"
                );
            }
            let (after, _) = run.optimizer.download(gpu).unwrap();
            for (name, tensor) in &moments {
                assert_eq!(
                    bits(&tensor.data),
                    bits(&after[name].data),
                    "step {i}: skipped step changed {name}"
                );
            }
        } else {
            updates += 1;
            run.reference_step(&g, updates);
        }
        let (_, counts) = run.optimizer.download(gpu).unwrap();
        assert!(counts.values().all(|&c| c == updates), "step {i}: Adam counts {counts:?}, want {updates}");
    }
    assert_eq!(run.optimizer.download_scaler(gpu).unwrap(), (512.0, 0), "grown after 3 clean steps");
    for (slot, (p, s)) in run.params.iter().zip(&run.host).enumerate() {
        let got = gpu.read::<f32>(p).unwrap();
        assert_close(&format!("param {slot} after 6 updates of 8 steps"), &got, &s.param, 1e-5, 1e-6);
    }
}

/// A tensor whose length is a multiple of 4 is updated four elements an invocation (one
/// vec4); any other length one at a time. Both do the same arithmetic per element: the
/// first 4k elements of a (4k + 1)-long tensor end bit for bit as a 4k-long tensor with
/// the same values, after three steps, with and without the f16 copy.
#[test]
fn the_vec4_update_gives_the_scalar_update_bits() {
    let gpu = gpu();
    let cfg = AdamConfig::adamw();
    let n = 1000;
    let run = |len: usize| -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<f32>) {
        let param = gpu.upload("param", &[len], &random_vec(n + 1, 21, 1.0)[..len]).unwrap();
        let (m, v, grad) = (
            gpu.zeros("m", &[len]).unwrap(),
            gpu.zeros("v", &[len]).unwrap(),
            gpu.zeros("g", &[len]).unwrap(),
        );
        let coef = gpu.upload("coef", &[2], &[0.5f32, 0.0]).unwrap();
        let counts = Counts::new(gpu, 1, &cfg);
        let half = gpu.zeros_of("param f16", &[len], ElementType::F16).unwrap();
        for step in 1..=3u32 {
            gpu.write(&counts.counts, &[step - 1]).unwrap();
            gpu.write(&grad, &random_vec(n + 1, 30 + step, 0.5)[..len]).unwrap();
            let copy = (step != 2).then_some(&half);
            submit_adam_step(
                gpu,
                [&param, &grad, &m, &v],
                (&coef, 0),
                (1e-3, 0.01),
                &counts.at(0),
                &cfg,
                copy,
            );
        }
        let read = |t: &Tensor| bits(&gpu.read::<f32>(t).unwrap()[..n]);
        (read(&param), read(&m), read(&v), gpu.read_f16(&half).unwrap()[..n].to_vec())
    };
    let (vec4, scalar) = (run(n), run(n + 1));
    assert_eq!(vec4.0, scalar.0, "param");
    assert_eq!(vec4.1, scalar.1, "m");
    assert_eq!(vec4.2, scalar.2, "v");
    assert_eq!(bits(&vec4.3), bits(&scalar.3), "f16 copy");
}
