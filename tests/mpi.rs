//! Data-parallel training under mpirun (`--features mpi`; `.ci/run` runs it): two ranks on
//! one adapter train the demo's tiny model and must match one process at the same global
//! batch, hold identical parameters, leave the run directory to rank 0, and stop together,
//! naming the rank, when one rank fails. Every mpirun has a deadline: a hang fails the test.
//!
//! The launcher tests start this same test binary under mpirun, running `rank_worker`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use pals::model::BertConfig;
use pals::train::LogRecords;
use pals::train::trainer::{TrainSettings, Trainer};

const STEPS: u64 = 20;
const RANKS: usize = 2;

/// The demo's tiny model without dropout: each rank draws dropout masks from its own rows'
/// positions, so with dropout the ranks' masks differ from one process's.
fn config() -> BertConfig {
    BertConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..pals::train::demo::config()
    }
}

fn settings() -> TrainSettings {
    TrainSettings {
        tasks: pals::train::demo::tasks(3).iter().map(|t| t.spec.name.clone()).collect(),
        method: "pals".parse().unwrap(),
        pal_dim: Some(12),
        batch_size: 8,
        lr: 1e-3,
        epochs: 1,
        steps_per_epoch: STEPS as usize,
        seed: 3,
        max_eval_examples: Some(40),
        ..TrainSettings::default()
    }
}

/// Trains the tiny model for STEPS steps into `out` on this process's ranks.
fn train(out: &Path) -> Trainer<'static> {
    let shared = pals::model::random_weights(&config(), 3);
    let data = pals::train::demo::tasks(3);
    let mut trainer =
        Trainer::new(common::gpu(), settings(), config(), &shared, &BTreeMap::new(), data, out, out).unwrap();
    trainer.run(&AtomicBool::new(false), &indicatif::ProgressBar::hidden()).unwrap();
    trainer
}

/// FNV-1a of every parameter's bits, in checkpoint order.
fn parameter_hash(trainer: &Trainer) -> u64 {
    let checkpoint = trainer.checkpoint(false).unwrap();
    let tensors = checkpoint.shared.values().chain(checkpoint.tasks.values().flat_map(|w| w.values()));
    tensors.fold(pals::dist::HASH_START, |h, t| {
        pals::dist::hash_bits(h, &t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    })
}

/// One rank of the launcher tests (run under mpirun; ignored otherwise). Rank r trains into
/// $PALS_MPI_TEST_DIR/rank<r> — only rank 0's should appear — and writes its parameters'
/// hash beside it.
#[test]
#[ignore = "run by the other tests under mpirun"]
fn rank_worker() {
    let base = PathBuf::from(std::env::var("PALS_MPI_TEST_DIR").expect("PALS_MPI_TEST_DIR"));
    let comm = pals::dist::init().unwrap();
    assert_eq!(comm.size(), RANKS, "the worker runs under mpirun -n {RANKS}");
    let rank = comm.rank();
    let trainer = train(&base.join(format!("rank{rank}")));
    std::fs::write(base.join(format!("hash{rank}")), parameter_hash(&trainer).to_string()).unwrap();
    drop(trainer);
    pals::dist::finalize();
}

/// `mpirun -n RANKS` (or an MPMD command line in `args`), failing the test after `deadline`.
fn mpirun(args: &[&str], env: &[(&str, &Path)], deadline: Duration) -> Output {
    let mut command = Command::new("mpirun");
    command.args(["--oversubscribe", "--allow-run-as-root"]).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (Open MPI) must be installed to run the MPI tests");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("mpirun hung past {deadline:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.wait_with_output().unwrap()
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pals-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn two_ranks_match_one_process_at_the_same_global_batch() {
    let single = fresh_dir("single");
    let one = train(&single);
    let want = LogRecords::read(&single.join("metrics.jsonl")).unwrap();

    let base = fresh_dir("ranks");
    let exe = std::env::current_exe().unwrap();
    let n = RANKS.to_string();
    let args =
        ["-n", &n, exe.to_str().unwrap(), "--ignored", "--exact", "rank_worker", "--test-threads", "1"];
    let output = mpirun(&args, &[("PALS_MPI_TEST_DIR", &base)], Duration::from_secs(600));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "mpirun failed: {stderr}\n{}", String::from_utf8_lossy(&output.stdout));

    let got = LogRecords::read(&base.join("rank0/metrics.jsonl")).unwrap();
    assert_eq!(got.steps.len(), STEPS as usize, "rank 0 logs every step once");
    // Each rank sums half the rows and rank 0 adds the halves: the gradients differ from
    // one process's in float summation order only (~1e-7 relative), which 20 Adam steps
    // grow to about 1e-5 in the loss; a wrong shard, share or reduction is off by >1e-2.
    for (a, b) in got.steps.iter().zip(&want.steps) {
        assert_eq!((a.step, &a.task), (b.step, &b.task), "the same task at every step");
        let tolerance = 1e-4 * b.loss.abs().max(1.0);
        assert!(
            (a.loss - b.loss).abs() <= tolerance,
            "step {}: loss {} on 2 ranks, {} on one",
            a.step,
            a.loss,
            b.loss
        );
    }
    let hashes: Vec<String> =
        (0..RANKS).map(|r| std::fs::read_to_string(base.join(format!("hash{r}"))).unwrap()).collect();
    assert!(hashes.iter().all(|h| *h == hashes[0]), "parameters differ across ranks: {hashes:?}");
    assert_ne!(hashes[0], parameter_hash(&one).to_string(), "2 ranks reduce in another order than 1");
    assert!(base.join("rank0/last/shared.safetensors").exists(), "rank 0 writes the run");
    assert!(!base.join("rank1").exists(), "rank 1 wrote into its run directory");
    let _ = std::fs::remove_dir_all(&single);
    let _ = std::fs::remove_dir_all(&base);
}

/// `pals train` with `extra` flags on rank 1 only, on data that does not exist: the run
/// must stop on every rank before it reads any.
fn train_with_rank1_flags(name: &str, extra: &[&str]) -> (Output, PathBuf) {
    let out = fresh_dir(name).join("run");
    let exe = env!("CARGO_BIN_EXE_pals");
    let missing = out.join("missing");
    let common = ["train", "--model", missing.to_str().unwrap(), "--glue-dir", missing.to_str().unwrap()];
    let output_flag = ["--output", out.to_str().unwrap(), "--tasks", "rte", "--batch-size", "8"];
    let mut args = vec!["-n", "1", exe];
    args.extend(common.iter().chain(&output_flag));
    args.extend([":", "-n", "1", exe]);
    args.extend(common.iter().chain(&output_flag).chain(extra));
    (mpirun(&args, &[], Duration::from_secs(120)), out)
}

#[test]
fn a_flag_given_differently_to_one_rank_stops_every_rank_naming_it() {
    let (output, out) = train_with_rank1_flags("settings", &["--lr", "0.5"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the run should fail: {stderr}");
    assert!(stderr.contains("rank 1 was given other run settings") && stderr.contains("--lr"), "{stderr}");
    assert!(!out.exists(), "nothing was written");
}

#[test]
fn one_failing_rank_stops_the_others_waiting_for_it() {
    // Rank 1 cannot open its adapter; rank 0 is already waiting in the settings check.
    let (output, _) = train_with_rank1_flags("adapter", &["--adapter", "no-such-adapter"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the run should fail: {stderr}");
    assert!(stderr.contains("rank 1 of 2") && stderr.contains("no-such-adapter"), "{stderr}");
}
