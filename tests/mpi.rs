//! Data-parallel training under mpirun (`--features mpi`; `.ci/run` runs it): two ranks on
//! one adapter train the demo's tiny model with dropout and must match one process at the
//! same global batch, hold identical parameters, evaluate sharded to one process's scores,
//! resume bit for bit, leave the run directory to rank 0, and stop together, naming the
//! rank, when one rank fails. Every mpirun has a deadline: a hang fails the test.
//!
//! The launcher tests start this same test binary under mpirun, running `rank_worker`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pals::model::BertConfig;
use pals::train::LogRecords;
use pals::train::checkpoint::Checkpoint;
use pals::train::trainer::{TrainSettings, Trainer};

const STEPS: u64 = 20;
const RANKS: usize = 2;
/// The interrupted run of the resume check stops after this many steps.
const STOP_AFTER: u64 = 13;

/// The demo's tiny model, with its dropout (0.1): each rank draws its slice of the global
/// batch's masks, so the ranks reproduce one process's masks.
fn config() -> BertConfig {
    BertConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        ..pals::train::demo::config()
    }
}

/// Two epochs of 10 steps: the dev sets are evaluated (sharded) twice.
fn settings(stop_after: Option<u64>) -> TrainSettings {
    TrainSettings {
        tasks: pals::train::demo::tasks(3).iter().map(|t| t.spec.name.clone()).collect(),
        method: "pals".parse().unwrap(),
        pal_dim: Some(12),
        batch_size: 8,
        lr: 1e-3,
        epochs: 2,
        steps_per_epoch: STEPS as usize / 2,
        seed: 3,
        max_eval_examples: Some(40),
        stop_after,
        ..TrainSettings::default()
    }
}

fn trainer(out: &Path, stop_after: Option<u64>) -> Trainer<'static> {
    let shared = pals::model::random_weights(&config(), 3);
    let data = pals::train::demo::tasks(3);
    Trainer::new(common::gpu(), settings(stop_after), config(), &shared, &BTreeMap::new(), data, out, out)
        .unwrap()
}

fn run(trainer: &mut Trainer) {
    trainer.run(&AtomicBool::new(false), &indicatif::ProgressBar::hidden()).unwrap();
}

/// Trains the tiny model for STEPS steps into `out` on this process's ranks.
fn train(out: &Path) -> Trainer<'static> {
    let mut trainer = trainer(out, None);
    run(&mut trainer);
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

/// One rank of the launcher tests (run under mpirun; ignored otherwise). Rank r trains
/// into $PALS_MPI_TEST_DIR/rank<r>/whole — only rank 0's should appear — and writes its
/// parameters' hash beside it; then trains STOP_AFTER steps into rank<r>/parts, and
/// resumes that from rank 0's checkpoint to the end, as `pals train --resume` does.
#[test]
#[ignore = "run by the other tests under mpirun"]
fn rank_worker() {
    let base = PathBuf::from(std::env::var("PALS_MPI_TEST_DIR").expect("PALS_MPI_TEST_DIR"));
    let comm = pals::dist::init().unwrap();
    assert_eq!(comm.size(), RANKS, "the worker runs under mpirun -n {RANKS}");
    let rank = comm.rank();
    let mine = base.join(format!("rank{rank}"));
    let whole = train(&mine.join("whole"));
    std::fs::write(base.join(format!("hash{rank}")), parameter_hash(&whole).to_string()).unwrap();
    drop(whole);

    run(&mut trainer(&mine.join("parts"), Some(STOP_AFTER)));
    pals::dist::wait_for_all(comm); // rank 0 has saved parts/last
    let checkpoint = Checkpoint::load(&base.join("rank0/parts/last"), true).unwrap();
    let mut resumed = trainer(&mine.join("parts"), None);
    resumed.restore(&checkpoint).unwrap();
    run(&mut resumed);
    drop(resumed);
    pals::dist::finalize();
}

/// `mpirun -n RANKS` (or an MPMD command line in `args`), failing the test after `deadline`.
/// One at a time: two mpiruns starting together race to create Open MPI's session
/// directory ("mkdir … File exists") and one fails.
fn mpirun(args: &[&str], env: &[(&str, &Path)], deadline: Duration) -> Output {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

/// The workers' directory after one `mpirun -n RANKS rank_worker`, shared by the tests
/// that check its parts (a launch costs minutes on lavapipe).
fn ranks_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let base = fresh_dir("ranks");
        let exe = std::env::current_exe().unwrap();
        let n = RANKS.to_string();
        let args =
            ["-n", &n, exe.to_str().unwrap(), "--ignored", "--exact", "rank_worker", "--test-threads", "1"];
        let output = mpirun(&args, &[("PALS_MPI_TEST_DIR", &base)], Duration::from_secs(900));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "mpirun failed: {stderr}\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        base
    })
}

/// One process's run of the same training (same global batch), and its parameters' hash.
fn single_run() -> &'static (PathBuf, String) {
    static RUN: OnceLock<(PathBuf, String)> = OnceLock::new();
    RUN.get_or_init(|| {
        let single = fresh_dir("single");
        let hash = parameter_hash(&train(&single)).to_string();
        (single, hash)
    })
}

#[test]
fn two_ranks_match_one_process_at_the_same_global_batch_with_dropout() {
    let (single, single_hash) = single_run();
    let want = LogRecords::read(&single.join("metrics.jsonl")).unwrap();
    let base = ranks_run();
    let got = LogRecords::read(&base.join("rank0/whole/metrics.jsonl")).unwrap();
    assert_eq!(got.steps.len(), STEPS as usize, "rank 0 logs every step once");
    // Each rank sums half the rows and rank 0 adds the halves: the gradients differ from
    // one process's in float summation order only (~1e-7 relative), which 20 Adam steps
    // grow to about 1e-5 in the loss; a wrong shard, share, reduction or dropout mask
    // (another mask is another loss) is off by >1e-2.
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
    assert_ne!(hashes[0], *single_hash, "2 ranks reduce in another order than 1");
    assert!(base.join("rank0/whole/last/shared.safetensors").exists(), "rank 0 writes the run");
    assert!(!base.join("rank1").exists(), "rank 1 wrote into its run directory");
}

/// The sharded evaluation of the ranks' final parameters (rank 0's last eval record)
/// scores what one process scores evaluating the same parameters (their checkpoint).
#[test]
fn two_ranks_evaluate_sharded_to_one_process_scores() {
    let base = ranks_run();
    let log = LogRecords::read(&base.join("rank0/whole/metrics.jsonl")).unwrap();
    assert_eq!(log.evals.len(), 2, "one evaluation per epoch");
    let last = log.evals.last().unwrap();
    assert_eq!(last.step as u64, STEPS);
    let checkpoint = Checkpoint::load(&base.join("rank0/whole/last"), true).unwrap();
    let out = fresh_dir("evaluate");
    let mut one = trainer(&out, None);
    one.restore(&checkpoint).unwrap();
    let scores = one.evaluate().unwrap();
    assert_eq!(scores.len(), last.tasks.len(), "{:?}", last.tasks);
    // Each rank batches its half of a dev set apart, so a regression score may move in
    // the last float bit; a lost, doubled or reordered slice moves a metric by >1e-2.
    for score in &scores {
        let theirs = &last.tasks[&score.task];
        for (metric, value) in &score.metrics {
            let got = theirs[metric];
            assert!((got - value).abs() <= 1e-6, "{} {metric}: {got} on 2 ranks, {value} on one", score.task);
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Stopped after STOP_AFTER steps and resumed at the same number of ranks, the run is bit
/// for bit the uninterrupted one: losses, evaluations and parameters.
#[test]
fn two_ranks_resume_bit_identical_to_an_uninterrupted_run() {
    let base = ranks_run();
    let read = |run: &str| LogRecords::read(&base.join(format!("rank0/{run}/metrics.jsonl"))).unwrap();
    let (whole, parts) = (read("whole"), read("parts"));
    let bits = |log: &LogRecords| log.steps.iter().map(|s| (s.step, s.loss.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&parts).len(), STEPS as usize, "every step logged once");
    assert_eq!(bits(&whole), bits(&parts), "losses differ after resuming");
    let glue = |log: &LogRecords| log.evals.iter().map(|e| e.glue.to_bits()).collect::<Vec<_>>();
    assert_eq!(glue(&whole), glue(&parts), "evaluations differ after resuming");
    let load = |run: &str| Checkpoint::load(&base.join(format!("rank0/{run}/last")), true).unwrap();
    let (x, y) = (load("whole"), load("parts"));
    assert_eq!(x.state.ranks, RANKS, "the checkpoint records its ranks");
    for (name, tensor) in &x.shared {
        let bits = |t: &pals::model::HostTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(tensor), bits(&y.shared[name]), "{name} differs after resuming");
    }
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

#[test]
fn a_flag_one_rank_cannot_parse_stops_every_rank_naming_it() {
    let (output, out) = train_with_rank1_flags("parse", &["--lr", "fast"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the run should fail: {stderr}");
    assert!(stderr.contains("rank 1 of 2") && stderr.contains("--lr") && stderr.contains("fast"), "{stderr}");
    assert!(!out.exists(), "nothing was written");
}

/// The recorder's path of the overlapped reduction, in one process: each group of tensors
/// comes back as the part of the work that last uses it finishes, with its final values,
/// while later parts (which write other tensors) still run.
#[test]
fn readbacks_return_each_group_when_its_part_is_done() {
    use pals::kernels::elementwise;
    let gpu = common::gpu();
    let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let t = |name: &str| gpu.upload(name, &[x.len()], &x).unwrap();
    let (a, b, c, d) = (t("a"), t("b"), t("c"), t("d"));
    let mut rec = gpu.recorder();
    elementwise::add_assign(&mut rec, &a, &b).unwrap(); // b = 2x: b done first
    elementwise::add_assign(&mut rec, &b, &c).unwrap(); // c = 3x
    elementwise::add_assign(&mut rec, &c, &d).unwrap(); // d = 4x: c and d done last
    elementwise::add_assign(&mut rec, &c, &d).unwrap(); // d = 7x
    assert_eq!(rec.finish_order(&[&d, &b, &c]), vec![1, 0, 2]);
    let readbacks = rec.submit_in_parts(&[vec![&c, &d], vec![&b]]).unwrap();
    let mut values: Vec<Vec<f32>> = readbacks.into_iter().map(|r| r.wait(gpu).unwrap()).collect();
    let times = |k: f32| x.iter().map(|v| v * k).collect::<Vec<_>>();
    let b_values = values.pop().unwrap();
    assert_eq!(b_values, times(2.0));
    assert_eq!(values[0], [times(3.0), times(7.0)].concat());
    assert_eq!(gpu.read::<f32>(&d).unwrap(), times(7.0), "the last part ran");
}
