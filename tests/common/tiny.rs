//! A tiny BERT model directory and a tiny GLUE directory (SST-2 and STS-B), written by the
//! tests that run `pals train`, `eval` and `predict` end to end.

use std::path::Path;
use std::process::{Command, Output};

use pals::model::{BertConfig, load::save_weights, random_weights};

const WORDS: &[&str] = &[
    "good", "bad", "great", "awful", "movie", "plot", "a", "the", "is", "was", "cat", "dog", "runs", "sits",
];

/// A tiny BERT: config.json, random weights, a WordPiece vocabulary.
pub fn tiny_model(dir: &Path) {
    tiny_model_with(dir, |_| {});
}

/// `tiny_model` with its config changed by `edit` before the weights are made.
pub fn tiny_model_with(dir: &Path, edit: impl FnOnce(&mut BertConfig)) {
    let mut config =
        BertConfig { vocab_size: 5 + WORDS.len(), max_position_embeddings: 64, ..BertConfig::tiny(2, 32, 4) };
    edit(&mut config);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    save_weights(dir.join("model.safetensors"), &random_weights(&config, 5)).unwrap();
    let vocab =
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().chain(WORDS).copied().collect::<Vec<_>>();
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
}

fn sentence(i: usize, len: usize) -> String {
    (0..len).map(|j| WORDS[(i * 7 + j * 3) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

/// SST-2 and STS-B in GLUE's layout: train, dev and test files.
pub fn tiny_glue(dir: &Path) {
    let sst = dir.join("SST-2");
    std::fs::create_dir_all(&sst).unwrap();
    let rows = |n: usize, labels: bool| {
        let mut text = String::from(if labels { "sentence\tlabel\n" } else { "index\tsentence\n" });
        for i in 0..n {
            let s = sentence(i, 3 + i % 5);
            text +=
                &if labels { format!("{s}\t{}\n", s.contains("good") as u8) } else { format!("{i}\t{s}\n") };
        }
        text
    };
    std::fs::write(sst.join("train.tsv"), rows(64, true)).unwrap();
    std::fs::write(sst.join("dev.tsv"), rows(20, true)).unwrap();
    std::fs::write(sst.join("test.tsv"), rows(13, false)).unwrap();
    let sts = dir.join("STS-B");
    std::fs::create_dir_all(&sts).unwrap();
    let pairs = |n: usize, labels: bool| {
        let mut text =
            String::from("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2");
        text += if labels { "\tscore\n" } else { "\n" };
        for i in 0..n {
            let (a, b) = (sentence(i, 4), sentence(i + i % 3, 4));
            text += &format!("{i}\tmain\tx\t2012\t{i:04}\tnone\tnone\t{a}\t{b}");
            text += &if labels { format!("\t{:.3}\n", (i % 6) as f32 * 0.9) } else { "\n".to_string() };
        }
        text
    };
    std::fs::write(sts.join("train.tsv"), pairs(48, true)).unwrap();
    std::fs::write(sts.join("dev.tsv"), pairs(16, true)).unwrap();
    std::fs::write(sts.join("test.tsv"), pairs(11, false)).unwrap();
}

/// Runs the built `pals` binary with `args`, its tuning and tokenization cache in `cache`.
pub fn pals(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pals")).args(args).env("PALS_CACHE_DIR", cache).output().unwrap()
}

/// What a run printed on stderr.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
