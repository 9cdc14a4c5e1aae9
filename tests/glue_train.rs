//! `pals train`, `eval` and `predict` end to end on GLUE-format files: first on a tiny
//! model and a tiny GLUE directory this test writes (always runs), then a short real run
//! with all-MiniLM-L6-v2 on SST-2 and STS-B when PALS_MODEL_DIR and PALS_GLUE_DIR are set
//! (CI sets both; a longer real run is in the closing notes of the training issue).

mod common;

use std::path::{Path, PathBuf};

use common::gpu;
use common::tiny::{tiny_glue, tiny_model};
use pals::train::LogRecords;
use pals::train::commands::{self, DataDirs};
use pals::train::trainer::TrainSettings;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pals-glue-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn settings(steps: usize, batch: usize, max_length: usize, lr: f32, eval: Option<usize>) -> TrainSettings {
    TrainSettings {
        tasks: vec!["sst-2".into(), "sts-b".into()],
        batch_size: batch,
        max_length,
        lr,
        epochs: 1,
        steps_per_epoch: steps,
        max_eval_examples: eval,
        ..TrainSettings::default()
    }
}

fn check_run(output: &Path, steps: usize) -> LogRecords {
    let log = LogRecords::read(&output.join("metrics.jsonl")).unwrap();
    assert_eq!(log.steps.len(), steps, "one log line per step");
    assert!(log.steps.iter().all(|s| s.loss.is_finite() && s.lr > 0.0));
    assert_eq!(log.evals.len(), 1);
    let tasks = &log.evals[0].tasks;
    assert!(tasks.contains_key("SST-2") && tasks.contains_key("STS-B"), "{tasks:?}");
    for dir in ["last", "best"] {
        assert!(output.join(dir).join("shared.safetensors").exists(), "{dir}/ written");
        assert!(output.join(dir).join("tasks/SST-2.safetensors").exists());
    }
    assert!(output.join("training.svg").exists());
    log
}

#[test]
fn train_eval_and_predict_on_a_tiny_model_and_glue_directory() {
    let root = temp("tiny");
    let (model, glue, output, predictions) =
        (root.join("model"), root.join("glue"), root.join("run"), root.join("predictions"));
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model);
    tiny_glue(&glue);
    let start = commands::Start { save_init: true, ..Default::default() };
    commands::train(gpu(), &model, &DataDirs::glue(&glue), &output, settings(10, 8, 16, 1e-3, None), &start)
        .unwrap();
    check_run(&output, 10);
    assert!(output.join("init/shared.safetensors").exists(), "--save-init");

    // The checkpoint is self-contained: eval and predict without the model directory.
    std::fs::remove_dir_all(&model).unwrap();
    commands::eval(gpu(), &output, &DataDirs::glue(&glue)).unwrap();
    commands::predict(gpu(), &output, &DataDirs::glue(&glue), &predictions).unwrap();
    let sst = std::fs::read_to_string(predictions.join("SST-2.tsv")).unwrap();
    let lines: Vec<&str> = sst.lines().collect();
    assert_eq!(lines[0], "index\tprediction");
    assert_eq!(lines.len(), 1 + 13);
    assert!(
        lines[1..]
            .iter()
            .enumerate()
            .all(|(i, l)| l.starts_with(&format!("{i}\t")) && (l.ends_with("\t0") || l.ends_with("\t1")))
    );
    let sts = std::fs::read_to_string(predictions.join("STS-B.tsv")).unwrap();
    assert_eq!(sts.lines().count(), 1 + 11);
    for line in sts.lines().skip(1) {
        let score: f32 = line.split('\t').nth(1).unwrap().parse().unwrap();
        assert!((0.0..=5.0).contains(&score), "{line}");
    }

    // A resumed run refuses other tasks instead of mixing checkpoints.
    let other = TrainSettings { tasks: vec!["sst-2".into()], ..settings(10, 8, 16, 1e-3, None) };
    let resume = commands::Start { resume: true, given: vec!["tasks".into()], ..Default::default() };
    let error = commands::train(gpu(), &glue, &DataDirs::glue(&glue), &output, other, &resume)
        .unwrap_err()
        .to_string();
    assert!(error.contains("--resume"), "{error}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn short_real_run_with_minilm_on_sst2_and_stsb() {
    let (Some(model), Some(glue)) = (std::env::var_os("PALS_MODEL_DIR"), std::env::var_os("PALS_GLUE_DIR"))
    else {
        eprintln!("PALS_MODEL_DIR or PALS_GLUE_DIR not set: the real GLUE training run did not run");
        return;
    };
    let output = temp("minilm");
    let steps = 12;
    commands::train(
        gpu(),
        Path::new(&model),
        &DataDirs::glue(Path::new(&glue)),
        &output,
        settings(steps, 8, 32, 1e-4, Some(48)),
        &commands::Start::default(),
    )
    .unwrap();
    let log = check_run(&output, steps);
    let sts = log.evals[0].tasks["STS-B"]["pearson"];
    eprintln!(
        "short MiniLM run: losses {:?}, dev {:?}",
        log.steps.iter().map(|s| s.loss).collect::<Vec<_>>(),
        log.evals[0].tasks
    );
    assert!(sts.is_finite());
    let _ = std::fs::remove_dir_all(&output);
}
