//! Custom tasks (`--task NAME=DIR`): their files (CSV, TSV, JSON lines), as run_glue reads
//! `--train_file`: the kind guessed from the labels or forced, classes from train, every bad
//! row an error naming its file and line; the tokenization cache never serving an edited
//! file stale; the CLI's refusals of bad flags; and, on the tiny model, training beside a GLUE
//! task with eval, predict, serve and resume keeping the original label strings.

mod common;

use std::path::{Path, PathBuf};

use common::tiny::{pals, stderr, tiny_glue, tiny_model};
use common::{TempDir, gpu};
use pals::data::Tokenizer;
use pals::data::cache::tokenized_custom_split;
use pals::data::custom::{CustomArg, CustomTask, Kind};
use pals::data::glue::{Label, Split};
use pals::serve::infer::{Answer, CheckpointModel, Infer};
use pals::train::LogRecords;
use pals::train::commands::{self, DataDirs, Start};
use pals::train::trainer::TrainSettings;

fn folder(tag: &str, files: &[(&str, &str)]) -> TempDir {
    let dir = TempDir::new(tag);
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn task(dir: &TempDir, suffix: &str) -> Result<CustomTask, String> {
    let arg: CustomArg = format!("mine={}{suffix}", dir.0.display()).parse().map_err(|e| format!("{e}"))?;
    CustomTask::from_arg(&arg).map_err(|e| e.to_string())
}

fn labels(task: &CustomTask, split: Split) -> Vec<Option<Label>> {
    task.read(split).unwrap().examples.into_iter().map(|e| e.label).collect()
}

#[test]
fn flag_parses_name_folder_and_kind() {
    let arg: CustomArg = "reviews=data/reviews:regression".parse().unwrap();
    assert_eq!(arg.name, "reviews");
    assert_eq!(arg.dir, std::path::PathBuf::from("data/reviews"));
    assert_eq!(arg.kind, Some(Kind::Regression));
    let arg: CustomArg = "r=C:/data:classification".parse().unwrap();
    assert_eq!((arg.dir.to_str(), arg.kind), (Some("C:/data"), Some(Kind::Classification)));
    let arg: CustomArg = "r=data/x:y".parse().unwrap();
    assert_eq!((arg.dir.to_str(), arg.kind), (Some("data/x:y"), None));
    for bad in ["reviews", "=dir", "a b=dir", "name="] {
        let error = bad.parse::<CustomArg>().unwrap_err().to_string();
        assert!(error.contains("--task") && error.contains(bad), "{bad}: {error}");
    }
}

#[test]
fn csv_string_labels_make_sorted_classes_and_quotes_work() {
    let dir = folder(
        "custom-csv",
        &[
            (
                "train.csv",
                "text,label\n\"Great, really\",pos\nawful,neg\n\"He said \"\"meh\"\"\nand left\",neutral\n",
            ),
            ("dev.csv", "label,text\npos,fine\r\nneg,bad\r\n"),
            ("test.csv", "id,text\n7,what\n8,\"who, me\"\n"),
        ],
    );
    let task = task(&dir, "").unwrap();
    assert_eq!(task.kind, Kind::Classification);
    assert_eq!(task.labels, ["neg", "neutral", "pos"]);
    assert_eq!(task.num_labels(), 3);
    let train = task.read(Split::Train).unwrap();
    let texts: Vec<&str> = train.examples.iter().map(|e| e.text_a.as_str()).collect();
    assert_eq!(texts, ["Great, really", "awful", "He said \"meh\"\nand left"]);
    // Each row's line is where it starts.
    assert_eq!(train.examples.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(
        labels(&task, Split::Train),
        [Some(Label::Class(2)), Some(Label::Class(0)), Some(Label::Class(1))]
    );
    assert_eq!(labels(&task, Split::Dev), [Some(Label::Class(2)), Some(Label::Class(0))]);
    let test = task.read(Split::Test).unwrap();
    assert_eq!(test.examples[1].id.as_deref(), Some("8"));
    assert_eq!(test.examples[1].text_a, "who, me");
    assert_eq!(test.examples[1].label, None);
    assert_eq!(task.label_name(1), Some("neutral"));
}

#[test]
fn integers_classify_in_numeric_order_and_floats_regress() {
    let dir = folder(
        "custom-tsv",
        &[
            ("train.tsv", "sentence1\tsentence2\tlabel\na\tb\t10\nc\td\t2\ne\tf\t2\n"),
            ("dev.tsv", "sentence1\tsentence2\tlabel\nx\ty\t10\n"),
        ],
    );
    let task = task(&dir, "").unwrap();
    assert_eq!(
        (task.kind, task.labels.clone()),
        (Kind::Classification, vec!["2".to_string(), "10".to_string()])
    );
    let dev = task.read(Split::Dev).unwrap();
    assert_eq!(dev.examples[0].text_b.as_deref(), Some("y"));
    assert_eq!(dev.examples[0].label, Some(Label::Class(1)));
    assert!(!task.has(Split::Test));

    let dir = folder(
        "custom-jsonl",
        &[
            ("train.jsonl", "{\"text\": \"a\", \"label\": 0.5}\n\n{\"text\": \"b\", \"label\": 3}\n"),
            ("dev.jsonl", "{\"text\": \"c\", \"label\": 4.25}\n"),
        ],
    );
    let task = self::task(&dir, "").unwrap();
    assert_eq!((task.kind, task.num_labels()), (Kind::Regression, 1));
    assert_eq!(labels(&task, Split::Train), [Some(Label::Score(0.5)), Some(Label::Score(3.0))]);
    assert_eq!(labels(&task, Split::Dev), [Some(Label::Score(4.25))]);
    // The suffix overrides the guess: integer scores as regression.
    let dir = folder(
        "custom-forced",
        &[
            ("train.json", "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 5}\n"),
            ("dev.json", "{\"text\": \"c\", \"label\": 2}\n"),
        ],
    );
    let task = self::task(&dir, ":regression").unwrap();
    assert_eq!(labels(&task, Split::Dev), [Some(Label::Score(2.0))]);
}

/// A folder's files: (name, content).
type Files<'a> = &'a [(&'a str, &'a str)];

/// Each bad input's error names the file and line (or the folder) and says what is wrong.
#[test]
fn bad_rows_name_file_and_line() {
    let cases: [(Files, Split, &str); 8] = [
        (
            &[("train.csv", "text,label\na,x\nb,y\n"), ("dev.csv", "text,label\nc,x\nd,z\n")],
            Split::Dev,
            "dev.csv:3: label \"z\" never occurs in train",
        ),
        (
            &[("train.csv", "text,label\na,x\nb,y,extra\n")],
            Split::Train,
            "train.csv:3: 3 fields, the header has 2",
        ),
        (
            &[("train.csv", "words,label\na,x\n")],
            Split::Train,
            "train.csv:1: no 'text' or 'sentence1' column (found: words, label)",
        ),
        (
            &[("train.csv", "text,label\n\"open,x\n")],
            Split::Train,
            "train.csv:2: a quoted field is never closed",
        ),
        (
            &[("train.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"text\": 3, \"label\": 2}\n")],
            Split::Train,
            "train.jsonl:2: 'text' is not a string",
        ),
        (
            &[("train.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 2\n")],
            Split::Train,
            "train.jsonl:2: not JSON",
        ),
        (
            &[("train.tsv", "text\tlabel\na\t0.5\nb\tlots\n")],
            Split::Train,
            "train.tsv:3: label \"lots\" is not a number",
        ),
        (
            &[("train.csv", "text,label\na,1\n"), ("train.tsv", "text\tlabel\na\t1\n")],
            Split::Train,
            "more than one train file",
        ),
    ];
    for (i, (files, split, want)) in cases.into_iter().enumerate() {
        let dir = folder(&format!("custom-bad{i}"), files);
        let error = match task(&dir, "") {
            Ok(task) => task.read(split).map(|_| ()).unwrap_err().to_string(),
            Err(error) => error,
        };
        assert!(error.contains(want), "case {i}: {error}");
    }
    let dir = folder("custom-empty", &[("dev.csv", "text,label\na,1\n")]);
    let error = task(&dir, "").unwrap_err();
    assert!(error.contains("no train file") && error.contains(&dir.0.display().to_string()), "{error}");
}

#[test]
fn an_edited_file_is_never_served_stale_from_the_cache() {
    let dir = folder(
        "custom-cache",
        &[
            ("train.csv", "text,label\ngood movie,pos\nbad plot,neg\n"),
            ("dev.csv", "text,label\ngood,pos\nbad,neg\n"),
        ],
    );
    let model = TempDir::new("custom-cache-model");
    tiny_model(&model.0);
    let tokenizer = Tokenizer::from_dir(&model.0).unwrap();
    let cache = dir.join("cache");
    let dev = |task: &CustomTask| {
        let split = tokenized_custom_split(&tokenizer, task, Split::Dev, 16, Some(&cache)).unwrap();
        let labels: Vec<Option<Label>> = split.examples.iter().map(|e| e.label).collect();
        (labels, split.cached)
    };
    let first = task(&dir, "").unwrap();
    assert_eq!(dev(&first), (vec![Some(Label::Class(1)), Some(Label::Class(0))], false));
    assert_eq!(dev(&first), (vec![Some(Label::Class(1)), Some(Label::Class(0))], true), "cached");
    // The dev file edited: its new bytes are another cache file.
    std::fs::write(dir.join("dev.csv"), "text,label\ngood,neg\nbad,neg\n").unwrap();
    assert_eq!(dev(&first), (vec![Some(Label::Class(0)), Some(Label::Class(0))], false));
    // The same dev file, but train gained a class sorting first ("meh"): the classes are
    // renumbered, and the cache key holds them.
    std::fs::write(dir.join("train.csv"), "text,label\ngood movie,pos\nbad plot,neg\nthe cat,meh\n").unwrap();
    let renumbered = task(&dir, "").unwrap();
    assert_eq!(renumbered.labels, ["meh", "neg", "pos"]);
    assert_eq!(dev(&renumbered), (vec![Some(Label::Class(1)), Some(Label::Class(1))], false));
}

/// A refusal by the program itself (exit 1) or by clap (exit 2), with every `wanted` part.
fn assert_refused(output: &std::process::Output, code: i32, wanted: &[&str], what: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{what}: exit status {:?}: {text}", output.status);
    for part in wanted {
        assert!(text.contains(part), "{what}: '{part}' not in: {text}");
    }
}

#[test]
fn bad_task_flags_are_refused_naming_the_flag_before_anything_is_loaded() {
    let tmp =
        folder("custom-cli", &[("train.csv", "text,label\na,x\nb,y\n"), ("dev.csv", "text,label\na,x\n")]);
    let dir = tmp.0.display().to_string();
    let output = tmp.join("run");
    let train = ["train", "--model", "/nonexistent/model", "--glue-dir", "/nonexistent/glue"];
    let (mine, clash, twice) = (format!("mine={dir}"), format!("R_T_E={dir}"), format!("Mine={dir}"));
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (vec!["--task", "mine"], 2, vec!["--task mine: no '='", "NAME=DIR"]),
        (vec!["--task", "a b=dir"], 2, vec!["the name must be letters, digits"]),
        (
            vec!["--task", "mine=/nonexistent/data"],
            1,
            vec!["config error", "/nonexistent/data is not a folder"],
        ),
        (vec!["--tasks", "rte", "--task", &clash], 1, vec!["config error", "--task R_T_E", "GLUE task"]),
        (vec!["--task", &mine, "--task", &twice], 1, vec!["config error", "another --task is named mine"]),
        (vec![], 1, vec!["config error: no tasks", "--task NAME=DIR"]),
    ];
    for (flags, code, wanted) in cases {
        let mut args: Vec<&str> = train.to_vec();
        args.extend(["--output", output.to_str().unwrap()]);
        args.extend(&flags);
        let result = pals(&args, &tmp.0);
        assert_refused(&result, code, &wanted, &flags.join(" "));
        assert!(!stderr(&result).contains("/nonexistent/model"), "{flags:?}: checked before loading");
        assert!(!output.exists(), "{flags:?}: nothing written");
    }
}

/// Lines of a prediction file after its header: (index, prediction).
fn prediction_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("index\tprediction"), "{}", path.display());
    lines
        .map(|l| {
            let (i, p) = l.split_once('\t').unwrap();
            (i.parse().unwrap(), p.to_string())
        })
        .collect()
}

const WORDS: [&str; 6] = ["good", "bad", "great", "awful", "cat", "dog"];

/// `reviews` (CSV, three string labels) and `rating` (JSON lines, sentence pairs, scores
/// 0–10: past STS-B's 0–5, which a custom task must not be clamped to).
fn write_custom_tasks(root: &Path) -> (PathBuf, PathBuf) {
    let reviews = root.join("reviews");
    std::fs::create_dir_all(&reviews).unwrap();
    let review = |i: usize| {
        let (word, label) = [("good", "pos"), ("awful", "neg"), ("cat", "meh")][i % 3];
        (format!("\"a {word} movie, {}\"", WORDS[i % 6]), label)
    };
    let rows = |n: usize| (0..n).map(|i| format!("{},{}\n", review(i).0, review(i).1)).collect::<String>();
    std::fs::write(reviews.join("train.csv"), format!("text,label\n{}", rows(30))).unwrap();
    std::fs::write(reviews.join("dev.csv"), format!("text,label\n{}", rows(9))).unwrap();
    let test = (0..7).map(|i| format!("{i},{}\n", review(i + 1).0)).collect::<String>();
    std::fs::write(reviews.join("test.csv"), format!("id,text\n{test}")).unwrap();
    let rating = root.join("rating");
    std::fs::create_dir_all(&rating).unwrap();
    let pairs = |n: usize, labels: bool| {
        (0..n)
            .map(|i| {
                let (a, b) = (WORDS[i % 6], WORDS[(i * 5) % 6]);
                let label =
                    if labels { format!(", \"label\": {:.1}", (i % 5) as f32 * 2.5) } else { String::new() };
                format!("{{\"sentence1\": \"the {a}\", \"sentence2\": \"a {b}\"{label}}}\n")
            })
            .collect::<String>()
    };
    std::fs::write(rating.join("train.jsonl"), pairs(24, true)).unwrap();
    std::fs::write(rating.join("dev.jsonl"), pairs(8, true)).unwrap();
    std::fs::write(rating.join("test.jsonl"), pairs(5, false)).unwrap();
    (reviews, rating)
}

fn custom_arg(name: &str, dir: &Path) -> CustomArg {
    format!("{name}={}", dir.display()).parse().unwrap()
}

/// Two custom tasks train beside a GLUE task on the tiny model; the checkpoint alone (plus
/// the data) evaluates, predicts and serves them with the train files' label strings, also
/// after their folder moved; resuming refuses data with other classes and goes on with the
/// same ones.
#[test]
fn custom_tasks_train_beside_glue_and_keep_their_labels_through_eval_predict_serve_and_resume() {
    let root = TempDir::new("custom-train");
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    tiny_model(&model);
    let (glue, glue_task) = match std::env::var_os("PALS_GLUE_DIR") {
        Some(dir) => {
            eprintln!("the GLUE task: RTE from PALS_GLUE_DIR={}", Path::new(&dir).display());
            (PathBuf::from(dir), "RTE")
        }
        None => {
            eprintln!(
                "PALS_GLUE_DIR not set: the GLUE task is the tiny SST-2 this test writes, not real GLUE"
            );
            tiny_glue(&root.join("glue"));
            (root.join("glue"), "SST-2")
        }
    };
    let (reviews, rating) = write_custom_tasks(&root.0);
    let output = root.join("run");
    let settings = TrainSettings {
        tasks: vec![glue_task.into()],
        batch_size: 8,
        max_length: 16,
        lr: 1e-3,
        epochs: 2,
        steps_per_epoch: 3,
        sampling: "round-robin".into(),
        max_eval_examples: Some(24),
        stop_after: Some(4),
        ..TrainSettings::default()
    };
    let data = DataDirs {
        glue: Some(glue.clone()),
        custom: vec![custom_arg("reviews", &reviews), custom_arg("rating", &rating)],
    };
    commands::train(gpu(), &model, &data, &output, settings.clone(), &Start::default()).unwrap();

    // Every task trained and was scored: the custom classification by accuracy and macro-F1.
    let log = LogRecords::read(&output.join("metrics.jsonl")).unwrap();
    let trained: Vec<&str> = log.steps.iter().map(|s| s.task.as_str()).collect();
    assert_eq!(trained, [glue_task, "reviews", "rating", glue_task]);
    let scores = &log.evals[0].tasks;
    assert_eq!(scores["reviews"]["score"], scores["reviews"]["acc"]);
    assert!(
        scores["reviews"].contains_key("macro_f1") && scores["rating"].contains_key("spearman"),
        "{scores:?}"
    );
    assert!(scores.contains_key(glue_task), "{scores:?}");
    // The checkpoint holds the custom tasks: kind, classes, folder.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("best/run.json")).unwrap()).unwrap();
    assert_eq!(run["custom"][0]["name"], "reviews");
    assert_eq!(run["custom"][0]["kind"], "classification");
    assert_eq!(run["custom"][0]["labels"], serde_json::json!(["meh", "neg", "pos"]));
    assert_eq!(run["custom"][1]["kind"], "regression");
    assert_eq!(run["custom"][1]["dir"], rating.display().to_string());

    // The checkpoint's folders moved: eval refuses naming the recorded one; --task points
    // eval and predict at the new one.
    let moved = root.join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    let (reviews_moved, rating_moved) = (moved.join("reviews"), moved.join("rating"));
    std::fs::rename(&reviews, &reviews_moved).unwrap();
    std::fs::rename(&rating, &rating_moved).unwrap();
    let cache = root.join("cache");
    let (out, glue_flag) = (output.to_str().unwrap(), glue.to_str().unwrap());
    let eval = ["eval", "--checkpoint", out, "--glue-dir", glue_flag];
    let recorded = reviews.display().to_string();
    let wanted = ["task reviews", &recorded, "--task reviews=NEWDIR"];
    assert_refused(&pals(&eval, &cache), 1, &wanted, "eval, folders moved");
    let (flag_reviews, flag_rating) =
        (format!("reviews={}", reviews_moved.display()), format!("rating={}", rating_moved.display()));
    let moved_flags = ["--task", &flag_reviews, "--task", &flag_rating];
    let evaluated = pals(&[&eval[..], &moved_flags[..]].concat(), &cache);
    let table = String::from_utf8_lossy(&evaluated.stdout);
    assert!(evaluated.status.success(), "{}", stderr(&evaluated));
    assert!(table.contains("reviews") && table.contains("macro_f1") && table.contains("rating"), "{table}");
    let wrong = pals(&[&eval[..], &["--task", "nosuch=/tmp"][..]].concat(), &cache);
    assert_refused(
        &wrong,
        1,
        &["--task nosuch", "no custom task of that name", "reviews, rating"],
        "eval --task",
    );

    let moved_data = DataDirs {
        glue: Some(glue.clone()),
        custom: vec![custom_arg("reviews", &reviews_moved), custom_arg("rating", &rating_moved)],
    };
    let predictions = root.join("predictions");
    commands::predict(gpu(), &output, &moved_data, &predictions).unwrap();
    let labels = prediction_lines(&predictions.join("reviews.tsv"));
    assert_eq!(labels.len(), 7);
    for (i, (index, label)) in labels.iter().enumerate() {
        assert!(*index == i && ["meh", "neg", "pos"].contains(&label.as_str()), "{index} {label}");
    }
    let scores = prediction_lines(&predictions.join("rating.tsv"));
    assert_eq!(scores.len(), 5);
    assert!(scores.iter().all(|(_, s)| s.parse::<f32>().is_ok_and(f32::is_finite)), "{scores:?}");
    assert!(predictions.join(format!("{glue_task}.tsv")).exists());

    // The server answers with the same label strings as predict, for the same texts.
    let mut served = CheckpointModel::load(gpu(), &output, 8).unwrap();
    let info = served.info();
    let task = info.tasks.iter().position(|t| t.name == "reviews").unwrap();
    assert_eq!(info.tasks[task].labels, ["meh", "neg", "pos"]);
    let tokenizer = Tokenizer::from_dir(output.join("best")).unwrap();
    let custom_task = CustomTask { dir: reviews_moved.clone(), ..served_task(&run, 0) };
    let test = custom_task.read(Split::Test).unwrap();
    let inputs: Vec<_> =
        test.examples.iter().map(|e| tokenizer.encode_pair(&e.text_a, None, 16).unwrap()).collect();
    let outputs = served.predict(task, &inputs).unwrap();
    for ((_, label), output) in labels.iter().zip(&outputs) {
        let Answer::Class { label: answered, .. } = Answer::new(&info.tasks[task], output) else { panic!() };
        assert_eq!(&answered, label, "serve and predict agree");
    }

    // Resuming with data of other classes is refused, naming both label sets.
    let resume = Start { resume: true, given: vec!["tasks".into(), "custom".into()], ..Start::default() };
    let train_file = reviews_moved.join("train.csv");
    let original = std::fs::read_to_string(&train_file).unwrap();
    std::fs::write(&train_file, format!("{original}\"a new one\",wow\n")).unwrap();
    let error = commands::train(gpu(), &model, &moved_data, &output, settings.clone(), &resume).unwrap_err();
    let error = format!("{error:#}");
    assert!(error.contains("[meh, neg, pos]") && error.contains("[meh, neg, pos, wow]"), "{error}");
    // With the same classes, from the moved folders, it goes on to the end of the schedule.
    std::fs::write(&train_file, original).unwrap();
    let rest = TrainSettings { stop_after: None, ..settings };
    commands::train(gpu(), &model, &moved_data, &output, rest, &resume).unwrap();
    let log = LogRecords::read(&output.join("metrics.jsonl")).unwrap();
    assert_eq!((log.steps.len(), log.evals.len()), (6, 2));
    assert!(log.evals[1].tasks.contains_key("reviews"));
}

/// Custom task `i` of a checkpoint's run.json.
fn served_task(run: &serde_json::Value, i: usize) -> CustomTask {
    serde_json::from_value(run["custom"][i].clone()).unwrap()
}
