//! GLUE data: the TSV reader on small files written here (good and broken), the tokenization
//! cache (hits, invalidation, corrupt files), length-bucketed batches, and — when
//! PALS_GLUE_DIR points at a GLUE folder — every split of the real data.

use std::path::{Path, PathBuf};

use pals::data::Tokenizer;
use pals::data::batch::{
    BatchOptions, Labels, bucketed_order, eval_batches, make_batch, padding_fraction, scatter,
    sequential_order,
};
use pals::data::cache::{TokenizedExample, TokenizedSplit, tokenized_split};
use pals::data::glue::{DataError, Label, Split, Task, read_split, split_path};
use pals::data::tokenizer::BasicOptions;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("pals-glue-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` as `split` of `task` where GLUE's layout puts it.
    fn write(&self, task: Task, split: Split, text: &str) -> PathBuf {
        let path = split_path(self.path(), task, split).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn class(c: u32) -> Option<Label> {
    Some(Label::Class(c))
}

/// The message of a reader error, which must name `file` and `line`.
fn row_error(result: Result<impl std::fmt::Debug, DataError>, file: &Path, line: usize) -> String {
    let error = result.expect_err("a broken file must not read");
    assert!(matches!(error, DataError::Row { line: l, .. } if l == line), "{error}: wanted line {line}");
    let message = error.to_string();
    assert!(message.starts_with(&format!("{}:{line}: ", file.display())), "{message}");
    message
}

// ---------------------------------------------------------------------------------------------
// Names and labels

#[test]
fn task_and_split_names() {
    for task in Task::ALL {
        assert_eq!(Task::from_name(task.name()).unwrap(), task);
        assert_eq!(Task::from_name(&task.name().to_lowercase()).unwrap(), task);
    }
    assert_eq!(Task::from_name("sst2").unwrap(), Task::SST2);
    assert_eq!(Task::from_name("stsb").unwrap(), Task::STSB);
    assert_eq!(Task::from_name("Diagnostic").unwrap(), Task::AX);
    let error = Task::from_name("mnli-mm").unwrap_err().to_string();
    assert!(error.contains("unknown task 'mnli-mm'") && error.contains("SST-2"), "{error}");
    for split in Split::ALL {
        assert_eq!(Split::from_name(split.name()).unwrap(), split);
    }
    assert_eq!(Split::from_name("dev_matched").unwrap(), Split::Dev);
    assert_eq!(Split::from_name("Test-Mismatched").unwrap(), Split::TestMismatched);
    assert!(Split::from_name("valid").is_err());
}

#[test]
fn label_sets() {
    let n: Vec<usize> = Task::ALL.iter().map(|t| t.num_labels()).collect();
    assert_eq!(n, [2, 2, 2, 1, 2, 3, 2, 2, 2, 3]);
    assert!(Task::STSB.is_regression() && !Task::MNLI.is_regression());
    assert_eq!(Task::MNLI.labels(), ["contradiction", "entailment", "neutral"]);
    assert_eq!(Task::AX.labels(), Task::MNLI.labels());
    assert_eq!(Task::RTE.label_name(1), Some("not_entailment"));
    assert_eq!(Task::QNLI.label_name(0), Some("entailment"));
    assert_eq!(Task::WNLI.label_name(1), Some("1"));
    assert_eq!(Task::STSB.label_name(0), None);
    assert_eq!(Task::CoLA.label_name(2), None);
}

#[test]
fn file_layout() {
    let glue = Path::new("/g");
    let path = |t, s| split_path(glue, t, s).unwrap();
    assert_eq!(path(Task::SST2, Split::Train), glue.join("SST-2/train.tsv"));
    assert_eq!(path(Task::MNLI, Split::Dev), glue.join("MNLI/dev_matched.tsv"));
    assert_eq!(path(Task::MNLI, Split::DevMismatched), glue.join("MNLI/dev_mismatched.tsv"));
    assert_eq!(path(Task::MNLI, Split::Test), glue.join("MNLI/test_matched.tsv"));
    assert_eq!(path(Task::MNLI, Split::TestMismatched), glue.join("MNLI/test_mismatched.tsv"));
    assert_eq!(path(Task::AX, Split::Test), glue.join("diagnostic/diagnostic.tsv"));
    let error = split_path(glue, Task::RTE, Split::DevMismatched).unwrap_err();
    assert_eq!(error.to_string(), "RTE has no dev_mismatched split (it has: train, dev, test)");
    assert!(split_path(glue, Task::AX, Split::Train).is_err());
}

// ---------------------------------------------------------------------------------------------
// The reader on small files

#[test]
fn reads_every_tasks_columns() {
    let dir = TempDir::new("columns");
    let g = dir.path();
    dir.write(Task::CoLA, Split::Train, "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.\n");
    dir.write(Task::CoLA, Split::Test, "index\tsentence\n0\tBill whistled.\n");
    dir.write(Task::SST2, Split::Dev, "sentence\tlabel\nit 's charming . \t1\n");
    // A byte-order mark, unbalanced quotes (literal text) and Windows line ends.
    dir.write(
        Task::MRPC,
        Split::Train,
        "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n0\t1\t2\t\"He said\tShe said \"\r\n",
    );
    dir.write(
        Task::STSB,
        Split::Dev,
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n\
         0\tmain\tMSRvid\t2012\t0000\tnone\tnone\tA man.\tA person.\t4.250\n",
    );
    dir.write(
        Task::MNLI,
        Split::Dev,
        "index\tp\tpair\tgenre\tb1\tb2\tp1\tp2\ts1\ts2\tl1\tl2\tl3\tl4\tl5\tgold\n\
         0\t0\t0e\tfiction\t-\t-\t-\t-\tPremise.\tHypothesis.\tneutral\tneutral\tentailment\tneutral\tneutral\tneutral\n",
    );
    dir.write(
        Task::MNLI,
        Split::TestMismatched,
        "index\tp\tpair\tgenre\tb1\tb2\tp1\tp2\ts1\ts2\n7\t0\t0e\tfiction\t-\t-\t-\t-\tP.\tH.\n",
    );
    dir.write(Task::QQP, Split::Train, "id\tqid1\tqid2\tq1\tq2\tis_duplicate\n5\t1\t2\tWho?\tWhom?\t1\n");
    dir.write(Task::QQP, Split::Test, "id\tquestion1\tquestion2\n3\tWho?\tWhom?\n");
    dir.write(
        Task::RTE,
        Split::Train,
        "index\ts1\ts2\tlabel\n0\tA.\tB.\tnot_entailment\n1\tC.\tD.\tentailment\n",
    );
    dir.write(Task::WNLI, Split::Dev, "index\ts1\ts2\tlabel\n0\tA.\tB.\t1\n");
    dir.write(Task::AX, Split::Test, "index\tsentence1\tsentence2\n0\tThe cat sat.\tThe cat did not sit.");

    let cola = read_split(g, Task::CoLA, Split::Train).unwrap();
    assert_eq!(cola.examples.len(), 2, "CoLA train has no header");
    let e = &cola.examples[1];
    assert_eq!(
        (e.line, e.id.as_deref(), e.text_a.as_str(), e.text_b.as_ref(), e.label),
        (2, None, "Rode sailors the.", None, class(0))
    );
    let e = &read_split(g, Task::CoLA, Split::Test).unwrap().examples[0];
    assert_eq!((e.line, e.id.as_deref(), e.text_a.as_str(), e.label), (2, Some("0"), "Bill whistled.", None));
    let e = &read_split(g, Task::SST2, Split::Dev).unwrap().examples[0];
    assert_eq!((e.text_a.as_str(), e.label), ("it 's charming . ", class(1)));
    let e = &read_split(g, Task::MRPC, Split::Train).unwrap().examples[0];
    assert_eq!(
        (e.text_a.as_str(), e.text_b.as_deref(), e.label),
        ("\"He said", Some("She said \""), class(0))
    );
    let e = &read_split(g, Task::STSB, Split::Dev).unwrap().examples[0];
    assert_eq!(
        (e.text_a.as_str(), e.text_b.as_deref(), e.label),
        ("A man.", Some("A person."), Some(Label::Score(4.25)))
    );
    let e = &read_split(g, Task::MNLI, Split::Dev).unwrap().examples[0];
    assert_eq!(
        (e.text_a.as_str(), e.text_b.as_deref(), e.label),
        ("Premise.", Some("Hypothesis."), class(2))
    );
    let e = &read_split(g, Task::MNLI, Split::TestMismatched).unwrap().examples[0];
    assert_eq!(
        (e.id.as_deref(), e.text_a.as_str(), e.text_b.as_deref(), e.label),
        (Some("7"), "P.", Some("H."), None)
    );
    let e = &read_split(g, Task::QQP, Split::Train).unwrap().examples[0];
    assert_eq!((e.text_a.as_str(), e.text_b.as_deref(), e.label), ("Who?", Some("Whom?"), class(1)));
    let e = &read_split(g, Task::QQP, Split::Test).unwrap().examples[0];
    assert_eq!((e.id.as_deref(), e.text_a.as_str(), e.text_b.as_deref()), (Some("3"), "Who?", Some("Whom?")));
    let rte = read_split(g, Task::RTE, Split::Train).unwrap();
    assert_eq!(rte.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [class(1), class(0)]);
    assert_eq!(read_split(g, Task::WNLI, Split::Dev).unwrap().examples[0].label, class(1));
    let e = &read_split(g, Task::AX, Split::Test).unwrap().examples[0];
    assert_eq!(
        (e.id.as_deref(), e.text_b.as_deref(), e.label),
        (Some("0"), Some("The cat did not sit."), None)
    );
}

#[test]
fn qqp_skips_short_rows_and_counts_them() {
    let dir = TempDir::new("qqp");
    dir.write(
        Task::QQP,
        Split::Dev,
        "id\tqid1\tqid2\tq1\tq2\tis_duplicate\n0\t1\t2\tA?\tB?\t0\n1\t3\t4\tbroken\n2\t5\t6\tC?\tD?\t1\n\n",
    );
    let data = read_split(dir.path(), Task::QQP, Split::Dev).unwrap();
    assert_eq!(data.skipped, 2, "the short row and the blank line");
    assert_eq!(data.examples.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 4]);
    // A full row with a bad label is still an error.
    let path =
        dir.write(Task::QQP, Split::Dev, "id\tqid1\tqid2\tq1\tq2\tis_duplicate\n0\t1\t2\tA?\tB?\tyes\n");
    let message = row_error(read_split(dir.path(), Task::QQP, Split::Dev), &path, 2);
    assert!(message.contains("unknown label \"yes\""), "{message}");
}

#[test]
fn broken_rows_name_file_line_and_problem() {
    let dir = TempDir::new("broken");
    let g = dir.path();
    let path = dir.write(
        Task::MNLI,
        Split::Train,
        &format!("{}\n{}\n{}\n", mnli_row("h"), mnli_row("neutral"), mnli_row("foo")),
    );
    let message = row_error(read_split(g, Task::MNLI, Split::Train), &path, 3);
    assert!(
        message.contains("unknown label \"foo\"") && message.contains("contradiction, entailment, neutral"),
        "{message}"
    );

    let path = dir.write(Task::RTE, Split::Dev, "index\ts1\ts2\tlabel\n0\tA.\tB.\tentailment\n1\tA.\tB.\n");
    let message = row_error(read_split(g, Task::RTE, Split::Dev), &path, 3);
    assert!(message.contains("3 columns") && message.contains("need 4"), "{message}");

    let header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n";
    let path = dir.write(Task::STSB, Split::Train, &format!("{header}0\tg\tf\ty\to\ts\ts\tA.\tB.\tfive\n"));
    let message = row_error(read_split(g, Task::STSB, Split::Train), &path, 2);
    assert!(message.contains("unparsable score \"five\""), "{message}");
    let path = dir.write(Task::STSB, Split::Train, &format!("{header}0\tg\tf\ty\to\ts\ts\tA.\tB.\t5.5\n"));
    let message = row_error(read_split(g, Task::STSB, Split::Train), &path, 2);
    assert!(message.contains("outside 0–5"), "{message}");

    // CoLA's train file has no header: a header line there is a bad row (label "label").
    let path = dir.write(Task::CoLA, Split::Dev, "source\tlabel\tmark\tsentence\n");
    row_error(read_split(g, Task::CoLA, Split::Dev), &path, 1);

    let path = split_path(g, Task::SST2, Split::Train).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n").unwrap();
    let message = row_error(read_split(g, Task::SST2, Split::Train), &path, 3);
    assert!(message.contains("UTF-8"), "{message}");
}

fn mnli_row(label: &str) -> String {
    format!("0\t0\t0e\tfiction\t-\t-\t-\t-\tPremise.\tHypothesis.\t{label}\t{label}")
}

#[test]
fn a_missing_split_is_a_clear_error() {
    let dir = TempDir::new("missing");
    let error = read_split(dir.path(), Task::MNLI, Split::DevMismatched).unwrap_err();
    let want = format!(
        "split 'dev_mismatched' of MNLI not found at {}",
        dir.path().join("MNLI/dev_mismatched.tsv").display()
    );
    assert_eq!(error.to_string(), want);
}

// ---------------------------------------------------------------------------------------------
// The tokenization cache

const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", // 0..4
    "the", "cat", "sat", "dog", "ran", // 5..9
    ".", "a", "hello", "world", "Hello", // 10..14
];

fn tiny_tokenizer(dir: &Path, vocab: &[&str]) -> Tokenizer {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    Tokenizer::from_dir(dir).unwrap()
}

const RTE: &str = "index\ts1\ts2\tlabel\n0\tThe cat sat.\tA dog ran.\tentailment\n1\tHello world\tthe the the the the the the the\tnot_entailment\n";

#[test]
fn cache_hits_and_invalidates_on_every_input() {
    let dir = TempDir::new("cache");
    let (g, cache) = (dir.path(), dir.path().join("cache"));
    let tokenizer = tiny_tokenizer(&g.join("tok"), VOCAB);
    let split_file = dir.write(Task::RTE, Split::Train, RTE);
    let get = |t: &Tokenizer, max_len| {
        tokenized_split(t, g, Task::RTE, Split::Train, max_len, Some(&cache)).unwrap()
    };
    let files = || std::fs::read_dir(&cache).map_or(0, |d| d.count());

    let first = get(&tokenizer, 12);
    assert!(!first.cached);
    assert_eq!(files(), 1);
    assert_eq!((first.task.as_str(), first.split, first.skipped), ("RTE", Split::Train, 0));
    let e = &first.examples[0];
    assert_eq!(e.ids, [2, 5, 6, 7, 10, 3, 11, 8, 9, 10, 3]);
    assert_eq!(e.type_ids, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
    assert_eq!((e.label, e.index), (class(0), 0));
    // Truncated to 12 from the longer side.
    let e = &first.examples[1];
    assert_eq!(e.ids, [2, 12, 13, 3, 5, 5, 5, 5, 5, 5, 5, 3]);
    assert_eq!((e.label, e.index), (class(1), 1));

    let second = get(&tokenizer, 12);
    assert!(second.cached);
    assert_eq!(second.examples, first.examples);

    // Each input gives a new key, so a new file; going back hits the old one.
    assert!(!get(&tokenizer, 8).cached);
    assert_eq!(files(), 2);
    let cased = Tokenizer::from_vocab_txt(
        g.join("tok/vocab.txt"),
        BasicOptions { do_lower_case: false, ..Default::default() },
    )
    .unwrap();
    let cased_split = get(&cased, 12);
    assert!(!cased_split.cached, "vocab.txt options are not in the file but change the tokens");
    assert_eq!(cased_split.examples[1].ids[1..3], [14, 13]);
    let bigger = tiny_tokenizer(&g.join("tok2"), &[VOCAB, &["zebra"]].concat());
    assert!(!get(&bigger, 12).cached);
    std::fs::write(&split_file, RTE.replace("A dog ran.", "A dog sat.")).unwrap();
    assert!(!get(&tokenizer, 12).cached);
    assert_eq!(files(), 5);
    std::fs::write(&split_file, RTE).unwrap();
    assert!(get(&tokenizer, 12).cached);
    let other_task =
        dir.write(Task::WNLI, Split::Train, &RTE.replace("not_entailment", "1").replace("entailment", "0"));
    let wnli = tokenized_split(&tokenizer, g, Task::WNLI, Split::Train, 12, Some(&cache)).unwrap();
    assert!(!wnli.cached && other_task.exists());
    assert_eq!(files(), 6);

    // No cache dir: nothing cached, same result.
    let uncached = tokenized_split(&tokenizer, g, Task::RTE, Split::Train, 12, None).unwrap();
    assert!(!uncached.cached);
    assert_eq!(uncached.examples, first.examples);
}

#[test]
fn a_corrupt_cache_file_is_rebuilt() {
    let dir = TempDir::new("corrupt");
    let (g, cache) = (dir.path(), dir.path().join("cache"));
    let tokenizer = tiny_tokenizer(&g.join("tok"), VOCAB);
    dir.write(Task::RTE, Split::Dev, RTE);
    let get = || tokenized_split(&tokenizer, g, Task::RTE, Split::Dev, 16, Some(&cache)).unwrap();
    let first = get();
    let file = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
    let good = std::fs::read(&file).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    for damage in [good[..good.len() - 3].to_vec(), flipped, b"garbage".to_vec(), Vec::new()] {
        std::fs::write(&file, damage).unwrap();
        let rebuilt = get();
        assert!(!rebuilt.cached);
        assert_eq!(rebuilt.examples, first.examples);
        assert_eq!(std::fs::read(&file).unwrap(), good, "rewritten whole");
        assert!(get().cached);
    }
    // Only the cache file is there: no temporary files left behind.
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
}

#[test]
fn tokenizer_errors_name_the_line() {
    let dir = TempDir::new("tokerr");
    let tokenizer = tiny_tokenizer(&dir.path().join("tok"), VOCAB);
    let path = dir.write(Task::RTE, Split::Dev, RTE);
    // max_len 2 leaves no room for a pair's three special tokens.
    let error = tokenized_split(&tokenizer, dir.path(), Task::RTE, Split::Dev, 2, None).unwrap_err();
    assert!(matches!(error, DataError::Tokenize { line: 2, .. }), "{error}");
    assert!(error.to_string().starts_with(&format!("{}:2: ", path.display())), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Batches

/// Examples of the given lengths: ids 100 + position, token types 0 then 1, class = position % 3.
fn examples(lengths: &[usize]) -> Vec<TokenizedExample> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| TokenizedExample {
            ids: vec![100 + i as u32; n],
            type_ids: (0..n).map(|k| (k >= n / 2) as u32).collect(),
            label: class(i as u32 % 3),
            index: i,
        })
        .collect()
}

fn random_lengths(n: usize, seed: u32) -> Vec<usize> {
    (0..n as u32).map(|i| 3 + (pals::reference::rng::rng_u32(seed, 9, i) % 126) as usize).collect()
}

#[test]
fn bucketed_order_covers_every_example_once_and_saves_padding() {
    let lengths = random_lengths(5003, 1);
    let b = 16;
    let order = bucketed_order(&lengths, b, 42);
    assert_eq!(order, bucketed_order(&lengths, b, 42), "deterministic");
    assert_ne!(order, bucketed_order(&lengths, b, 43));
    assert_eq!(order.iter().filter(|rows| rows.len() != b).count(), 1, "one short batch");
    assert_eq!(order.iter().find(|rows| rows.len() != b).unwrap().len(), 5003 % b);
    let mut all: Vec<usize> = order.concat();
    all.sort();
    assert_eq!(all, (0..5003).collect::<Vec<_>>());

    let ex = examples(&lengths);
    let options = BatchOptions::new(b);
    let padding = |order: &[Vec<usize>]| {
        padding_fraction(&order.iter().map(|rows| make_batch(&ex, rows, &options)).collect::<Vec<_>>())
    };
    let (bucketed, plain) = (padding(&order), padding(&sequential_order(&lengths, b, false)));
    eprintln!("padding: bucketed {bucketed:.3}, file order {plain:.3}");
    assert!(bucketed < 0.05 && plain > 0.3, "bucketed {bucketed}, file order {plain}");
}

#[test]
fn a_batch_is_padded_to_its_longest_row() {
    let ex = examples(&[3, 5, 2]);
    let batch = make_batch(&ex, &[2, 0], &BatchOptions::new(4));
    let e = &batch.encoder;
    assert_eq!((e.batch, e.seq), (2, 3));
    assert_eq!(e.ids, [102, 102, 0, 100, 100, 100]);
    assert_eq!(e.type_ids, [0, 1, 0, 0, 1, 1]);
    assert_eq!(e.mask, [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
    assert_eq!(batch.labels, Labels::Class(vec![2, 0]));
    assert_eq!((batch.weights.as_slice(), batch.rows.as_slice()), ([1.0, 1.0].as_slice(), [2, 0].as_slice()));
    assert!((batch.padding_fraction() - 1.0 / 6.0).abs() < 1e-12);

    // Filled to B = 4 with weight-0 rows, S rounded up to 8, pad id 7.
    let options = BatchOptions { batch_size: 4, pad_to_batch: true, seq_multiple: 8, pad_id: 7 };
    let batch = make_batch(&ex, &[1, 2], &options);
    let e = &batch.encoder;
    assert_eq!((e.batch, e.seq), (4, 8));
    assert_eq!(e.ids[..8], [101, 101, 101, 101, 101, 7, 7, 7]);
    assert!(e.ids[16..].iter().all(|&id| id == 7) && e.mask[16..].iter().all(|&m| m == 0.0));
    assert_eq!(e.mask.iter().sum::<f32>(), 7.0);
    assert_eq!(batch.weights, [1.0, 1.0, 0.0, 0.0]);
    assert_eq!(batch.labels, Labels::Class(vec![1, 2, 0, 0]));
    assert_eq!(batch.rows, [1, 2]);
    assert!((batch.padding_fraction() - (1.0 - 7.0 / 32.0)).abs() < 1e-12);
    let exactly_8 = make_batch(&examples(&[8]), &[0], &options);
    assert_eq!(exactly_8.encoder.seq, 8);

    let mut scored = examples(&[2, 4]);
    scored[0].label = Some(Label::Score(1.5));
    scored[1].label = Some(Label::Score(4.0));
    assert_eq!(make_batch(&scored, &[1, 0], &options).labels, Labels::Score(vec![4.0, 1.5, 0.0, 0.0]));
    let mut test = examples(&[2]);
    test[0].label = None;
    assert_eq!(make_batch(&test, &[0], &options).labels, Labels::None);
}

#[test]
fn eval_batches_return_predictions_in_file_order() {
    let lengths = random_lengths(103, 2);
    let split = TokenizedSplit {
        task: "CoLA".into(),
        split: Split::Dev,
        examples: examples(&lengths),
        skipped: 0,
        cached: false,
    };
    let options = BatchOptions { pad_to_batch: true, ..BatchOptions::new(8) };
    for by_length in [false, true] {
        let batches = eval_batches(&split, &options, by_length);
        assert_eq!(batches.len(), 13);
        assert!(batches.iter().all(|b| b.encoder.batch == 8));
        if !by_length {
            assert_eq!(batches[0].rows, (0..8).collect::<Vec<_>>());
        }
        // The "prediction" of a row is the id its tokens carry: 100 + example position.
        let mut out = vec![0u32; split.examples.len()];
        for batch in &batches {
            let predictions: Vec<u32> =
                (0..batch.encoder.batch).map(|r| batch.encoder.ids[r * batch.encoder.seq]).collect();
            scatter(batch, &predictions, &mut out);
        }
        assert_eq!(out, (100..203).collect::<Vec<u32>>(), "by_length {by_length}");
    }
    let sorted = padding_fraction(&eval_batches(&split, &BatchOptions::new(8), true));
    let plain = padding_fraction(&eval_batches(&split, &BatchOptions::new(8), false));
    assert!(sorted < plain, "sorted {sorted}, file order {plain}");
}

// ---------------------------------------------------------------------------------------------
// The real GLUE data

/// Rows per split as shared/data/README.md lists them; None where the file is absent.
const REAL: [(Task, [Option<usize>; 3]); 10] = [
    (Task::CoLA, [Some(8551), Some(1043), Some(1063)]),
    (Task::SST2, [Some(67349), Some(872), Some(1821)]),
    (Task::MRPC, [Some(3667), Some(408), Some(1725)]),
    (Task::STSB, [Some(5749), Some(1500), Some(1379)]),
    (Task::RTE, [Some(2490), Some(277), Some(3000)]),
    (Task::WNLI, [Some(635), Some(71), Some(146)]),
    (Task::QNLI, [Some(8999), Some(5463), Some(5463)]),
    (Task::MNLI, [Some(8999), Some(1000), None]),
    (Task::QQP, [Some(8999), Some(1000), None]),
    (Task::AX, [None, None, Some(1104)]),
];

fn glue_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PALS_GLUE_DIR").map(PathBuf::from);
    if dir.is_none() {
        eprintln!("PALS_GLUE_DIR not set: real-GLUE test did not run");
    }
    dir
}

#[test]
fn real_glue_row_counts() {
    let Some(glue) = glue_dir() else { return };
    for (task, counts) in REAL {
        for (split, want) in [Split::Train, Split::Dev, Split::Test].into_iter().zip(counts) {
            if !task.splits().contains(&split) {
                continue;
            }
            let result = read_split(&glue, task, split);
            match want {
                Some(n) => {
                    let data = result.unwrap_or_else(|e| panic!("{task} {split}: {e}"));
                    assert_eq!((data.examples.len(), data.skipped), (n, 0), "{task} {split}");
                    let labelled = data.examples.iter().filter(|e| e.label.is_some()).count();
                    assert_eq!(labelled, if split.is_test() { 0 } else { n }, "{task} {split}");
                    if task.is_regression() || split.is_test() {
                        continue;
                    }
                    let mut per_class = vec![0; task.num_labels()];
                    for e in &data.examples {
                        if let Some(Label::Class(c)) = e.label {
                            per_class[c as usize] += 1;
                        }
                    }
                    eprintln!("{task} {split}: {n} rows, classes {per_class:?}");
                }
                None => assert!(matches!(result, Err(DataError::Missing { .. })), "{task} {split}"),
            }
        }
    }
    let error = read_split(&glue, Task::MNLI, Split::DevMismatched).unwrap_err();
    let path = glue.join("MNLI/dev_mismatched.tsv");
    assert_eq!(error.to_string(), format!("split 'dev_mismatched' of MNLI not found at {}", path.display()));
}

#[test]
fn real_glue_tokenizes_and_buckets() {
    let Some(glue) = glue_dir() else { return };
    let dir = TempDir::new("real");
    let tokenizer = match std::env::var_os("PALS_MODEL_DIR") {
        Some(model) => Tokenizer::from_dir(model).unwrap(),
        None => tiny_tokenizer(&dir.path().join("tok"), VOCAB),
    };
    let cache = dir.path().join("cache");
    for (task, split) in [
        (Task::RTE, Split::Train),
        (Task::STSB, Split::Dev),
        (Task::MNLI, Split::Dev),
        (Task::QQP, Split::Train),
    ] {
        let first = tokenized_split(&tokenizer, &glue, task, split, 128, Some(&cache)).unwrap();
        let again = tokenized_split(&tokenizer, &glue, task, split, 128, Some(&cache)).unwrap();
        assert!(!first.cached && again.cached);
        assert_eq!(first.examples, again.examples);
        assert!(first.examples.iter().all(|e| e.ids.len() <= 128 && e.ids.len() == e.type_ids.len()));
        let lengths = first.lengths();
        let bucketed: Vec<_> = bucketed_order(&lengths, 32, 42)
            .iter()
            .map(|r| make_batch(&first.examples, r, &BatchOptions::new(32)))
            .collect();
        let plain = eval_batches(&first, &BatchOptions::new(32), false);
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        let full = lengths.iter().filter(|&&n| n == 128).count();
        eprintln!(
            "{task} {split}: mean length {mean:.1}, {full} at 128, padding bucketed {:.3} vs file order {:.3}",
            padding_fraction(&bucketed),
            padding_fraction(&plain)
        );
        assert!(padding_fraction(&bucketed) < padding_fraction(&plain));
    }
}
