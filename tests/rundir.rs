//! The run directory's guarantees, each made to fail for real with the `pals` binary on a
//! tiny model: a crash between a checkpoint swap's renames is recovered by `train --resume`
//! and by `eval`; a run is never overwritten without `--overwrite`; `--resume` refuses flags
//! that differ from the saved run; a second trainer on one directory is refused; SIGTERM
//! saves a resumable checkpoint and exits non-zero; an unwritable cache is a warning; and the
//! metrics log survives torn lines.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use common::tiny::{pals, stderr, tiny_glue, tiny_model};
use pals::train::{LogRecords, LogWriter};

struct Setup {
    tmp: TempDir,
    model: PathBuf,
    glue: PathBuf,
    run: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let tmp = TempDir::new(tag);
    let (model, glue, run) = (tmp.join("model"), tmp.join("glue"), tmp.join("run"));
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model);
    tiny_glue(&glue);
    Setup { tmp, model, glue, run }
}

impl Setup {
    /// `pals train` arguments: SST-2 and STS-B, `epochs` epochs of `steps` steps, then
    /// `extra` (which replaces a default flag of the same name).
    fn train_args(&self, epochs: &str, steps: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["train", "--model", self.model.to_str().unwrap()];
        args.extend(["--glue-dir", self.glue.to_str().unwrap(), "--output", self.run.to_str().unwrap()]);
        let defaults = [
            ["--tasks", "sst-2,sts-b"],
            ["--batch-size", "8"],
            ["--max-length", "16"],
            ["--lr", "1e-3"],
            ["--epochs", epochs],
            ["--steps-per-epoch", steps],
        ];
        for [flag, value] in defaults {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend(extra);
        args.into_iter().map(String::from).collect()
    }

    fn train(&self, extra: &[&str], cache: &Path) -> Output {
        let args = self.train_args("2", "6", extra);
        pals(&args.iter().map(String::as_str).collect::<Vec<_>>(), cache)
    }

    fn steps_logged(&self) -> Vec<u32> {
        let log = LogRecords::read(&self.run.join("metrics.jsonl")).unwrap();
        log.steps.iter().map(|s| s.step).collect()
    }

    fn saved_step(&self, checkpoint: &str) -> u64 {
        let path = self.run.join(checkpoint).join("trainer_state.json");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        state["step"].as_u64().unwrap()
    }
}

fn assert_ok(output: &Output, what: &str) -> String {
    let text = stderr(output);
    assert!(output.status.success(), "{what} failed: {text}");
    text
}

fn assert_fails(output: &Output, wanted: &[&str], what: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{what}: exit status {:?}: {text}", output.status);
    for part in wanted {
        assert!(text.contains(part), "{what}: '{part}' not in: {text}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target)
        } else {
            std::fs::copy(&path, &target).map(|_| ()).unwrap()
        }
    }
}

#[test]
fn interrupted_swaps_are_recovered_and_runs_are_never_overwritten_or_resumed_with_other_flags() {
    let s = setup("rundir-swap");
    // A cache path under a regular file cannot be created: a warning, not an error.
    let cache = s.tmp.join("not-a-directory");
    std::fs::write(&cache, "").unwrap();
    let text = assert_ok(&s.train(&["--stop-after", "8", "--save-init"], &cache), "first run");
    assert!(text.contains("warning: tokenization cache not written"), "{text}");
    // stderr is a pipe here: evaluations and progress still arrive as plain lines.
    assert!(text.contains("step 6: dev GLUE average") && text.contains("step 6/12"), "{text}");
    assert!(!text.contains("interrupted") && s.saved_step("last") == 8);
    let log_before = std::fs::read(s.run.join("metrics.jsonl")).unwrap();

    // The run is there: a plain `train` is refused and changes nothing.
    let refused = s.train(&[], &cache);
    assert_fails(&refused, &["already holds a run", "--resume", "--overwrite"], "train over a run");
    assert_eq!(std::fs::read(s.run.join("metrics.jsonl")).unwrap(), log_before);
    // A flag that would change the saved run is refused, and named.
    assert_fails(&s.train(&["--resume", "--lr", "5e-4"], &cache), &["--lr 0.0005 (saved: 0.001)"], "--lr");
    let args = s.train_args("3", "6", &["--resume"]);
    let output = pals(&args.iter().map(String::as_str).collect::<Vec<_>>(), &cache);
    assert_fails(&output, &["--epochs 3 (saved: 2)"], "--epochs");

    // A crash between the renames of last/'s swap: last.old/ and a complete last.partial/.
    std::fs::rename(s.run.join("last"), s.run.join("last.partial")).unwrap();
    copy_dir(&s.run.join("init"), &s.run.join("last.old"));
    let text = assert_ok(&s.train(&["--resume", "--tasks", "SST-2,sts-b"], &cache), "resume");
    assert!(text.contains("recovered") && text.contains("at step 8"), "{text}");
    assert_eq!(s.steps_logged(), (0..12).collect::<Vec<_>>(), "the log continues, each step once");
    assert!(!s.run.join("last.old").exists() && !s.run.join("last.partial").exists());

    // A crash while best/ was being replaced: eval rolls back to it instead of scoring last/.
    std::fs::rename(s.run.join("best"), s.run.join("best.old")).unwrap();
    copy_dir(&s.run.join("last"), &s.run.join("best.partial"));
    std::fs::remove_file(s.run.join("best.partial/COMPLETE")).unwrap();
    let run = s.run.to_str().unwrap();
    let glue = s.glue.to_str().unwrap();
    let text = assert_ok(&pals(&["eval", "--checkpoint", run, "--glue-dir", glue], &cache), "eval");
    assert!(text.contains("rolled back") && text.contains(&format!("evaluating {run}/best")), "{text}");

    // A checkpoint without one of its task files is an error naming it.
    std::fs::remove_file(s.run.join("best/tasks/STS-B.safetensors")).unwrap();
    let output = pals(&["eval", "--checkpoint", run, "--glue-dir", glue], &cache);
    assert_fails(&output, &["weights error", "best/tasks/STS-B.safetensors"], "missing task file");

    // --overwrite replaces the run.
    assert_ok(&s.train(&["--overwrite", "--stop-after", "2"], &cache), "--overwrite");
    assert_eq!(s.steps_logged(), [0, 1]);
    assert!(!s.run.join("init").exists() && s.saved_step("last") == 2);
}

/// A child process that a failing test does not leave running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `path` holds at least one line (the trainer flushes its log every 16 steps).
fn wait_for_log(path: &Path, child: &mut std::process::Child) {
    let started = Instant::now();
    while std::fs::read_to_string(path).map_or(true, |t| t.lines().count() == 0) {
        assert!(child.try_wait().unwrap().is_none(), "the trainer ended early");
        assert!(started.elapsed() < Duration::from_secs(300), "no log line after 300 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_second_trainer_is_refused_and_sigterm_saves_a_resumable_checkpoint() {
    let s = setup("rundir-signal");
    let cache = s.tmp.join("cache");
    let args = s.train_args("1", "100000", &[]);
    let log = std::fs::File::create(s.tmp.join("first.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pals"))
        .args(&args)
        .env("PALS_CACHE_DIR", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut first = KillOnDrop(child);
    let first = &mut first.0;
    wait_for_log(&s.run.join("metrics.jsonl"), first);

    let second = s.train(&["--resume", "--stop-after", "1"], &cache);
    assert_fails(&second, &["in use by another pals process", &format!("process {}", first.id())], "second");

    let killed = Command::new("kill").args(["-TERM", &first.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = first.wait().unwrap();
    let text = std::fs::read_to_string(s.tmp.join("first.log")).unwrap();
    assert_eq!(status.code(), Some(1), "SIGTERM: saved and exited non-zero: {status:?}: {text}");
    assert!(text.contains("interrupted: saved a resumable checkpoint at step"), "{text}");
    let step = s.saved_step("last");
    assert!(step >= 16, "the log had a line, so at least 16 steps ran: {step}");
    assert_eq!(s.steps_logged().len() as u64, step, "every step before the save logged once");

    let args = s.train_args("1", "100000", &["--resume", "--stop-after", "2"]);
    let output = pals(&args.iter().map(String::as_str).collect::<Vec<_>>(), &cache);
    let text = assert_ok(&output, "resume after SIGTERM");
    assert!(text.contains(&format!("at step {step}")), "{text}");
    assert_eq!(s.steps_logged(), (0..step as u32 + 2).collect::<Vec<_>>());
}

#[test]
fn the_metrics_log_survives_torn_lines() {
    let tmp = TempDir::new("rundir-log");
    let path = tmp.join("metrics.jsonl");
    let step = |n: u32| format!("{{\"step\":{n},\"task\":\"RTE\",\"loss\":0.5,\"lr\":0.001,\"time\":1.0}}\n");
    // Two writers once interleaved: a torn line in the middle and one at the end.
    let text =
        format!("{}{}{{\"step\":2,\"ta\n{}{}{{\"step\":5,\"task\"", step(0), step(1), step(3), step(4));
    std::fs::write(&path, &text).unwrap();

    let error = LogRecords::read(&path).unwrap_err().to_string();
    assert!(error.contains(path.to_str().unwrap()) && error.contains("line 3"), "{error}");

    let mut writer = LogWriter::resume(&path, 4).unwrap();
    writer.write(&serde_json::from_str(&step(4)).unwrap()).unwrap();
    drop(writer);
    let (records, torn) = LogRecords::read_with_torn(&path).unwrap();
    assert_eq!(records.steps.iter().map(|s| s.step).collect::<Vec<_>>(), [0, 1, 3, 4]);
    assert_eq!(torn, None);
    let aside = std::fs::read_to_string(tmp.join("metrics.jsonl.torn")).unwrap();
    assert_eq!(aside.lines().count(), 2, "both torn lines kept aside: {aside}");

    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(b"{\"step\":5,").unwrap();
    let (records, torn) = LogRecords::read_with_torn(&path).unwrap();
    assert_eq!((records.steps.len(), torn), (4, Some(5)));
}
