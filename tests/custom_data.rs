//! Custom tasks' files (CSV, TSV, JSON lines), as run_glue reads `--train_file`: the kind
//! guessed from the labels or forced, classes from train, and every bad row an error naming
//! its file and line.

mod common;

use common::TempDir;
use pals::data::custom::{CustomArg, CustomTask, Kind};
use pals::data::glue::{Label, Split};

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
