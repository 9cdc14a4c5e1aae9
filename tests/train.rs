//! The training loop on the demo's synthetic tasks (no outside data): a resumed run gives
//! bit-identical losses and weights to an uninterrupted one, training lowers the loss,
//! and a checkpoint evaluates the same after a reload.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::gpu;
use pals::kernels::optimizer::LossScaling;
use pals::model::BertConfig;
use pals::train::LogRecords;
use pals::train::checkpoint::Checkpoint;
use pals::train::trainer::{Precision, TrainSettings, Trainer};

fn config() -> BertConfig {
    BertConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        ..pals::train::demo::config()
    }
}

fn settings(method: &str, stop_after: Option<u64>) -> TrainSettings {
    TrainSettings {
        tasks: pals::train::demo::tasks(3).iter().map(|t| t.spec.name.clone()).collect(),
        method: method.parse().unwrap(),
        pal_dim: Some(12),
        batch_size: 8,
        lr: 1e-3,
        epochs: 2,
        steps_per_epoch: 12,
        seed: 3,
        max_eval_examples: Some(40),
        stop_after,
        ..TrainSettings::default()
    }
}

fn output(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pals-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn trainer<'g>(method: &str, stop_after: Option<u64>, out: &Path) -> Trainer<'g> {
    let shared = pals::model::random_weights(&config(), 3);
    let data = pals::train::demo::tasks(3);
    Trainer::new(gpu(), settings(method, stop_after), config(), &shared, &BTreeMap::new(), data, out, out)
        .unwrap()
}

fn run(trainer: &mut Trainer) {
    trainer.run(&AtomicBool::new(false), &indicatif::ProgressBar::hidden()).unwrap();
}

fn losses(out: &Path) -> Vec<(u32, u32)> {
    let records = LogRecords::read(&out.join("metrics.jsonl")).unwrap();
    records.steps.iter().map(|s| (s.step, s.loss.to_bits())).collect()
}

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    for method in ["pals", "top-attn"] {
        let whole = output(&format!("whole-{method}"));
        run(&mut trainer(method, None, &whole));

        let parts = output(&format!("parts-{method}"));
        run(&mut trainer(method, Some(17), &parts));
        let checkpoint = Checkpoint::load(&parts.join("last"), true).unwrap();
        assert_eq!(checkpoint.state.step, 17);
        let mut resumed = trainer(method, None, &parts);
        resumed.restore(&checkpoint).unwrap();
        run(&mut resumed);

        let (a, b) = (losses(&whole), losses(&parts));
        assert_eq!(a.len(), 24, "{method}: every step logged once");
        assert_eq!(a, b, "{method}: losses differ after resuming");
        let (x, y) = (
            Checkpoint::load(&whole.join("last"), true).unwrap(),
            Checkpoint::load(&parts.join("last"), true).unwrap(),
        );
        for (name, tensor) in &x.shared {
            let bits = |t: &pals::model::HostTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(tensor), bits(&y.shared[name]), "{method}: {name} differs");
        }
        assert_eq!(x.optimizer.as_ref().unwrap().len(), y.optimizer.as_ref().unwrap().len());
        let _ = std::fs::remove_dir_all(&whole);
        let _ = std::fs::remove_dir_all(&parts);
    }
}

#[test]
fn training_lowers_the_loss_and_a_checkpoint_evaluates_the_same_after_reload() {
    let out = output("learn");
    let mut first = trainer("pals", None, &out);
    run(&mut first);
    let log = LogRecords::read(&out.join("metrics.jsonl")).unwrap();
    let mean = |s: &[pals::train::StepRecord]| s.iter().map(|r| r.loss as f64).sum::<f64>() / s.len() as f64;
    let (early, late) = (mean(&log.steps[..6]), mean(&log.steps[18..]));
    assert!(late < early, "loss did not fall: first steps {early:.4}, last steps {late:.4}");
    assert_eq!(log.evals.len(), 2, "one evaluation per epoch");
    let scores = first.evaluate().unwrap();

    // The saved model (no optimizer) evaluates to the same metrics in a fresh trainer.
    let checkpoint = Checkpoint::load(&out.join("last"), false).unwrap();
    let data = pals::train::demo::tasks(3);
    let mut reloaded = Trainer::new(
        gpu(),
        settings("pals", None),
        config(),
        &checkpoint.shared,
        &checkpoint.tasks,
        data,
        &out,
        &out,
    )
    .unwrap();
    let again = reloaded.evaluate().unwrap();
    for (a, b) in scores.iter().zip(&again) {
        assert_eq!(a.task, b.task);
        assert_eq!(a.score.to_bits(), b.score.to_bits(), "{}: {} vs {}", a.task, a.score, b.score);
    }
    // best/ holds the model of the best evaluation, without optimizer state.
    assert!(out.join("best/shared.safetensors").exists() && !out.join("best/optimizer.safetensors").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn separate_models_train_and_only_the_sampled_one_changes() {
    let out = output("separate");
    let mut t = trainer("separate", Some(1), &out);
    let before = t.checkpoint(false).unwrap();
    run(&mut t);
    let after = t.checkpoint(false).unwrap();
    let changed: Vec<&String> = before.tasks.keys().filter(|k| before.tasks[*k] != after.tasks[*k]).collect();
    assert_eq!(changed.len(), 1, "exactly the sampled task's model moves: {changed:?}");
    let _ = std::fs::remove_dir_all(&out);
}

fn mixed_trainer<'g>(stop_after: Option<u64>, out: &Path, scaling: LossScaling) -> Trainer<'g> {
    let shared = pals::model::random_weights(&config(), 3);
    let data = pals::train::demo::tasks(3);
    let settings = TrainSettings { precision: Precision::Mixed, ..settings("pals", stop_after) };
    let mut trainer =
        Trainer::new(gpu(), settings, config(), &shared, &BTreeMap::new(), data, out, out).unwrap();
    trainer.set_loss_scaling(scaling).unwrap();
    trainer
}

/// (loss scale, skipped) of every logged step.
fn scales(out: &Path) -> Vec<(f32, bool)> {
    let records = LogRecords::read(&out.join("metrics.jsonl")).unwrap();
    records.steps.iter().map(|s| (s.scale.unwrap(), s.skipped.unwrap())).collect()
}

/// Mixed precision (f16 copies of the encoder's Linear weights in the big products, a
/// power-of-two loss scale, f32 everywhere else) tracks the f32 run's losses, and is not
/// the f32 run (the f16 path ran): f16 rounds each weight by at most 2^-11 relative, which
/// moves a loss near 1 by well under 1e-2 over these 24 steps. The scale grows every
/// `growth_interval` clean steps; resuming restores it and is bit-identical.
#[test]
fn mixed_precision_scales_the_loss_and_resumes_the_scale() {
    let growth = LossScaling { init_scale: 65536.0, growth_interval: 5 };
    let plain = output("plain-f32");
    run(&mut trainer("pals", None, &plain));
    let whole = output("mixed-whole");
    run(&mut mixed_trainer(None, &whole, growth));
    let values =
        |out: &Path| -> Vec<f32> { losses(out).iter().map(|&(_, bits)| f32::from_bits(bits)).collect() };
    common::assert_close("mixed vs f32 losses", &values(&whole), &values(&plain), 1e-2, 1e-2);
    assert_ne!(losses(&plain), losses(&whole), "mixed gave the f32 losses bit for bit: no f16 path ran");
    let want: Vec<(f32, bool)> = (0..24).map(|i| (65536.0 * 2f32.powi(i / 5), false)).collect();
    assert_eq!(scales(&whole), want, "the scale doubles every 5 clean steps");

    let parts = output("mixed-parts");
    run(&mut mixed_trainer(Some(13), &parts, growth));
    let checkpoint = Checkpoint::load(&parts.join("last"), true).unwrap();
    let saved = checkpoint.state.loss_scale.unwrap();
    assert_eq!((saved.scale, saved.growth), (65536.0 * 4.0, 3), "13 steps: 2 doublings, 3 since");
    let mut resumed = mixed_trainer(None, &parts, growth);
    resumed.restore(&checkpoint).unwrap();
    run(&mut resumed);
    assert_eq!(losses(&whole), losses(&parts), "losses differ after resuming");
    assert_eq!(scales(&whole), scales(&parts), "scales differ after resuming");
    for dir in [plain, whole, parts] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A scale so large that the scaled gradients overflow: the step is skipped (the weights
/// keep their bits, Adam counts nothing) and the scale halves, step after step.
#[test]
fn an_overflowing_mixed_step_is_skipped_and_halves_the_scale() {
    let huge = LossScaling { init_scale: 2f32.powi(120), growth_interval: 2000 };
    let out = output("mixed-overflow");
    let mut trainer = mixed_trainer(Some(2), &out, huge);
    trainer.save("init", false).unwrap();
    run(&mut trainer);
    assert_eq!(scales(&out), [(2f32.powi(120), true), (2f32.powi(119), true)]);
    let (init, last) = (
        Checkpoint::load(&out.join("init"), false).unwrap(),
        Checkpoint::load(&out.join("last"), true).unwrap(),
    );
    let bits = |t: &pals::model::HostTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (name, tensor) in &init.shared {
        assert_eq!(bits(tensor), bits(&last.shared[name]), "{name} changed in a skipped step");
    }
    assert!(last.state.adam_steps.values().all(|&n| n == 0), "a skipped step advanced Adam's count");
    assert_eq!(last.state.skipped_steps, 2);
    assert_eq!(last.state.loss_scale.map(|s| (s.scale, s.growth)), Some((2f32.powi(118), 0)));
    let _ = std::fs::remove_dir_all(out);
}
