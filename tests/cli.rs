//! Bad input to the `pals` binary: every out-of-range number is refused naming its flag
//! before any model or GPU is touched; configs whose tensors cannot exist are refused by
//! size; and, on a tiny model, a --max-length past the position table, empty splits, a
//! tokenizer larger than the embedding and I/O errors are clear errors (exit 1, no panic),
//! while `hidden_act: "gelu_python"` (accepted by the config) runs.

mod common;

use std::path::Path;

use common::TempDir;
use common::tiny::{pals, stderr, tiny_glue, tiny_model, tiny_model_with};

/// A failure the program reports itself: exit code 1 (not a panic's 101, not a signal).
fn assert_refused(output: &std::process::Output, wanted: &[&str], what: &str) -> String {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{what}: exit status {:?}: {text}", output.status);
    for part in wanted {
        assert!(text.contains(part), "{what}: '{part}' not in: {text}");
    }
    text
}

#[test]
fn every_bad_number_is_refused_naming_its_flag_before_anything_is_loaded() {
    let tmp = TempDir::new("cli-flags");
    let train =
        ["train", "--model", "/nonexistent/model", "--glue-dir", "/nonexistent/glue", "--tasks", "sst-2"];
    let output = tmp.join("run");
    let cases: &[(&[&str], &str)] = &[
        (&["--batch-size", "0"], "--batch-size"),
        (&["--lr=-1e-5"], "--lr"),
        (&["--lr", "NaN"], "--lr"),
        (&["--dropout", "1"], "--dropout"),
        (&["--dropout=-0.1"], "--dropout"),
        (&["--epochs", "0"], "--epochs"),
        (&["--steps-per-epoch", "0"], "--steps-per-epoch"),
        (&["--warmup", "1.5"], "--warmup"),
        (&["--max-length", "2"], "--max-length"),
        (&["--max-norm", "0"], "--max-norm"),
        (&["--weight-decay=-1"], "--weight-decay"),
        (&["--stop-after", "0"], "--stop-after"),
        (&["--max-eval-examples", "0"], "--max-eval-examples"),
        (&["--pal-dim", "0"], "--pal-dim"),
        (&["--sampling", "uniform"], "--sampling"),
        (&["--optimizer", "sgd"], "--optimizer"),
        (&["--clip", "max"], "--clip"),
        (&["--tasks", "sst-2,SST-2"], "SST-2 twice"),
        (&["--tasks", "imdb"], "imdb"),
    ];
    for (flags, named) in cases {
        let mut args: Vec<&str> = train.to_vec();
        args.extend(["--output", output.to_str().unwrap()]);
        args.extend(*flags);
        let text = assert_refused(&pals(&args, &tmp.0), &["config error", named], &flags.join(" "));
        assert!(!text.contains("/nonexistent"), "{flags:?}: checked before loading: {text}");
        assert!(!output.exists(), "{flags:?}: nothing written");
    }
    let others: &[(&[&str], &str)] = &[
        (&["encode", "--model", "/nonexistent", "--batch-size", "0"], "--batch-size"),
        (&["demo", "--epochs", "0"], "--epochs"),
        (&["bench", "--reps", "0"], "--reps"),
        (&["bench", "--fp16"], "--precision mixed"),
        (&["bench", "--tiles", "64x64"], "--tiles"),
        (&["bench", "--tiles", "64x64x64:nx"], "--tiles"),
        (&["params", "--pal-dim", "0"], "--pal-dim"),
        (&["params", "--tasks", "rte,RTE"], "RTE twice"),
    ];
    for (args, named) in others {
        assert_refused(&pals(args, &tmp.0), &["config error", named], &args.join(" "));
    }
}

#[test]
fn configs_whose_tensors_cannot_exist_are_refused_by_size() {
    let tmp = TempDir::new("cli-sizes");
    let cases = [
        ("num_hidden_layers", 1_000_000_000u64, "num_hidden_layers"),
        ("vocab_size", 1_000_000_000_000, "vocab_size"),
        ("hidden_size", 1_000_000_000 * 12, "hidden_size"),
        ("intermediate_size", 1 << 40, "intermediate_size"),
    ];
    for (field, value, named) in cases {
        let mut config = serde_json::to_value(pals::model::BertConfig::base()).unwrap();
        config[field] = value.into();
        std::fs::write(tmp.join("config.json"), config.to_string()).unwrap();
        for args in [["params", "--model"], ["bench", "--memory"]] {
            let output = pals(&[args[0], args[1], tmp.0.to_str().unwrap()], &tmp.0);
            let text = assert_refused(&output, &[named, "limit"], field);
            assert_eq!(text.matches("limit").count(), 1, "the cause once: {text}");
        }
    }
    let missing = pals(&["params", "--model", "/nonexistent/model"], &tmp.0);
    let text = assert_refused(&missing, &["/nonexistent/model/config.json"], "no config.json");
    assert_eq!(text.matches("No such file").count(), 1, "the cause once: {text}");
}

/// `pals train` on the tiny model and GLUE directory with `extra` flags.
fn train(model: &Path, glue: &Path, output: &Path, cache: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--model", model.to_str().unwrap(), "--glue-dir", glue.to_str().unwrap()];
    args.extend(["--output", output.to_str().unwrap(), "--tasks", "sst-2"]);
    args.extend(["--batch-size", "8", "--steps-per-epoch", "2", "--epochs", "1"]);
    if !extra.contains(&"--max-length") {
        args.extend(["--max-length", "16"]);
    }
    args.extend(extra);
    pals(&args, cache)
}

#[test]
fn bad_models_data_and_paths_are_clear_errors_on_a_tiny_model() {
    let tmp = TempDir::new("cli-tiny");
    let (model, glue, cache) = (tmp.join("model"), tmp.join("glue"), tmp.join("cache"));
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model);
    tiny_glue(&glue);

    // Longer than the position table: refused at start, naming both numbers.
    let output = train(&model, &glue, &tmp.join("long"), &cache, &["--max-length", "100"]);
    assert_refused(&output, &["--max-length 100", "max_position_embeddings 64"], "--max-length");

    // A tokenizer with more tokens than the embedding has rows.
    let small = tmp.join("small-vocab");
    std::fs::create_dir_all(&small).unwrap();
    tiny_model_with(&small, |c| c.vocab_size = 10);
    let output = train(&small, &glue, &tmp.join("vocab"), &cache, &[]);
    assert_refused(&output, &["config error", "vocab.txt", "19 tokens", "vocab_size is 10"], "vocab");

    // Empty splits name the split and the file.
    let empty = tmp.join("empty");
    tiny_glue(&empty);
    std::fs::write(empty.join("SST-2/dev.tsv"), "sentence\tlabel\n").unwrap();
    let output = train(&model, &empty, &tmp.join("empty-dev"), &cache, &[]);
    assert_refused(&output, &["data error", "SST-2 dev has no examples", "SST-2/dev.tsv"], "empty dev");
    std::fs::write(empty.join("SST-2/train.tsv"), "sentence\tlabel\n").unwrap();
    let output = train(&model, &empty, &tmp.join("empty-train"), &cache, &[]);
    assert_refused(&output, &["data error", "SST-2 train has no examples"], "empty train");

    // I/O errors say what was done to which path, and their cause once.
    let file = tmp.join("a-file");
    std::fs::write(&file, "").unwrap();
    let output = train(&model, &glue, &file.join("run"), &cache, &[]);
    let text = assert_refused(&output, &["creating output directory", "a-file/run"], "output under a file");
    assert_eq!(text.matches("Not a directory").count(), 1, "{text}");
    let unreadable = tmp.join("unreadable");
    tiny_glue(&unreadable);
    std::fs::remove_file(unreadable.join("SST-2/train.tsv")).unwrap();
    std::fs::create_dir(unreadable.join("SST-2/train.tsv")).unwrap();
    let output = train(&model, &unreadable, &tmp.join("unreadable-run"), &cache, &[]);
    let text = assert_refused(&output, &["SST-2/train.tsv"], "a directory for a file");
    assert_eq!(text.matches("Is a directory").count(), 1, "{text}");

    // What the config accepts, the encoder runs.
    let python = tmp.join("gelu-python");
    std::fs::create_dir_all(&python).unwrap();
    tiny_model_with(&python, |c| c.hidden_act = "gelu_python".into());
    let input = tmp.join("sentences.txt");
    std::fs::write(&input, "a good movie\nthe cat sits\n").unwrap();
    let output =
        pals(&["encode", "--model", python.to_str().unwrap(), "--input", input.to_str().unwrap()], &cache);
    assert!(output.status.success(), "gelu_python: {}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 2);
    // Its default length fits the model's 64 positions; an explicit longer one is refused.
    let model = python.to_str().unwrap();
    let input = input.to_str().unwrap();
    let output = pals(&["encode", "--model", model, "--input", input, "--max-length", "100"], &cache);
    assert_refused(&output, &["--max-length 100", "64 positions"], "encode --max-length");
}

/// `--fp16` is `--precision mixed`: saved in run.json, the loss scale logged with every
/// step, and on `--resume` a precision that differs from the saved run is refused while
/// the same one (by either flag) is accepted.
#[test]
fn fp16_is_mixed_precision_saved_logged_and_kept_on_resume() {
    let tmp = TempDir::new("cli-fp16");
    let (model, glue, cache, out) = (tmp.join("model"), tmp.join("glue"), tmp.join("cache"), tmp.join("run"));
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model);
    tiny_glue(&glue);
    let output = train(&model, &glue, &out, &cache, &["--fp16", "--stop-after", "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("last/run.json")).unwrap()).unwrap();
    assert_eq!(run["precision"], "mixed");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(
        log.lines().next().is_some_and(|l| l.contains("\"scale\":65536") && l.contains("\"skipped\":false")),
        "{log}"
    );

    let output = train(&model, &glue, &out, &cache, &["--resume", "--precision", "f32"]);
    assert_refused(&output, &["--precision f32 (saved: mixed)"], "resume with another precision");
    let output = train(&model, &glue, &out, &cache, &["--resume", "--fp16", "--stop-after", "1"]);
    assert!(output.status.success(), "resume with --fp16: {}", stderr(&output));
    let output = train(&model, &glue, &tmp.join("both"), &cache, &["--fp16", "--precision", "f32"]);
    assert_eq!(output.status.code(), Some(2), "clap refuses both: {}", stderr(&output));
}

/// `pals devices` says how each adapter multiplies; lavapipe's Vulkan adapter on the
/// subgroup kernel, which CPU adapters take by rule.
#[test]
fn devices_name_each_adapters_matmul() {
    let tmp = TempDir::new("cli-devices");
    let output = pals(&["devices"], &tmp.0);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}{}", text, stderr(&output));
    let adapters = text.lines().filter(|l| l.starts_with('[')).count();
    let matmul: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with("matmul: ")).collect();
    assert!(adapters > 0 && matmul.len() == adapters, "{text}");
    if text.contains("llvmpipe") && text.contains("backend Vulkan") {
        assert!(matmul.iter().any(|l| l.contains("subgroup kernel (")), "{text}");
    }
}

/// Output into a pipe nobody reads any more (`pals bench --memory base | true`) ends the
/// program as it ends other Unix tools, by SIGPIPE, not with a panic (exit 101 before).
#[cfg(unix)]
#[test]
fn a_closed_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    // The read end is closed before the program starts, so its first line meets no reader
    // (closing it after the spawn raced the program's first write).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_pals"))
        .args(["bench", "--memory", "base", "--batch", "32"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let text = stderr(&output);
    assert!(!text.contains("panicked"), "{text}");
    const SIGPIPE: i32 = 13; // on every Unix pals builds for
    assert_eq!(output.status.signal(), Some(SIGPIPE), "status {:?}: {text}", output.status);
}
