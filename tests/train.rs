//! The training loop on the demo's synthetic tasks (no outside data): a resumed run gives
//! bit-identical losses and weights to an uninterrupted one, training lowers the loss,
//! and a checkpoint evaluates the same after a reload.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::gpu;
use pals::model::BertConfig;
use pals::train::LogRecords;
use pals::train::checkpoint::Checkpoint;
use pals::train::trainer::{TrainSettings, Trainer};

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
