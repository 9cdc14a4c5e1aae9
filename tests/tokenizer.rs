//! The WordPiece tokenizer: a tiny vocab.txt written here (basic tokenizer, WordPiece, pair
//! packing and truncation), a tokenizer.json with truncation and padding switched on, and —
//! when PALS_MODEL_DIR points at all-MiniLM-L6-v2 (scripts/fetch-minilm.sh) — the real files.

mod common;

use std::path::{Path, PathBuf};

use common::TempDir;
use pals::data::tokenizer::BasicOptions;
use pals::data::{Encoded, Tokenizer, TokenizerError};

// The id of a token is its line number.
const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", // 0..4
    "the", "quick", "brown", "fox", "un", // 5..9
    "##aff", "##able", "runn", "##ing", ",", // 10..14
    ".", "!", "?", "hello", "world", // 15..19
    "中", "cafe", "Hello", // 20..22
];
const PAD: u32 = 0;
const UNK: u32 = 1;
const CLS: u32 = 2;
const SEP: u32 = 3;

fn tiny_dir(tag: &str, vocab: &[&str]) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    dir
}

fn tiny(tag: &str) -> (TempDir, Tokenizer) {
    let dir = tiny_dir(tag, VOCAB);
    let tokenizer = Tokenizer::from_dir(&dir.0).unwrap();
    (dir, tokenizer)
}

fn single(ids: &[u32]) -> Encoded {
    let ids: Vec<u32> = [CLS].iter().chain(ids).chain(&[SEP]).copied().collect();
    Encoded { type_ids: vec![0; ids.len()], ids }
}

#[test]
fn vocab_txt_wordpiece_lowercases_strips_accents_and_splits_punctuation() {
    let (_dir, t) = tiny("basic");
    assert_eq!((t.cls_id(), t.sep_id(), t.pad_id(), t.vocab_size()), (CLS, SEP, PAD, VOCAB.len()));
    let cases: [(&str, &[u32]); 8] = [
        ("Hello, World!", &[18, 14, 19, 16]),
        ("unaffable RUNNING", &[9, 10, 11, 12, 13]),
        // Unknown words, and words whose pieces are not all known, become one [UNK].
        ("the zebra foxes", &[5, UNK, UNK]),
        ("Café", &[21]),
        // CJK characters are words of their own.
        ("中国", &[20, UNK]),
        // Control characters vanish, any whitespace separates.
        ("the\u{0}\tquick\u{a0}brown\r\nfox", &[5, 6, 7, 8]),
        // Special tokens written in the text stay whole, as Hugging Face's BertTokenizer does.
        ("hello [SEP] world", &[18, SEP, 19]),
        ("", &[]),
    ];
    for (text, ids) in cases {
        assert_eq!(t.encode_pair(text, None, 64).unwrap(), single(ids), "{text:?}");
        assert_eq!(t.tokenize(text).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn do_lower_case_false_keeps_case_and_accents() {
    let dir = tiny_dir("cased", VOCAB);
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"do_lower_case": false, "model_max_length": 512}"#)
        .unwrap();
    let t = Tokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(t.tokenize("Hello hello HELLO Café cafe").unwrap(), [22, 18, UNK, UNK, 21]);
    let t = Tokenizer::from_vocab_txt(
        dir.join("vocab.txt"),
        BasicOptions { do_lower_case: false, ..BasicOptions::default() },
    )
    .unwrap();
    assert_eq!(t.tokenize("Hello Café").unwrap(), [22, UNK]);
}

#[test]
fn pairs_get_token_types_zero_then_one() {
    let (_dir, t) = tiny("pair");
    let got = t.encode_pair("The quick fox.", Some("Hello world?"), 64).unwrap();
    assert_eq!(got.ids, [CLS, 5, 6, 8, 15, SEP, 18, 19, 17, SEP]);
    assert_eq!(got.type_ids, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
    // An empty second text still gets its [SEP] with type 1.
    let got = t.encode_pair("fox", Some(""), 64).unwrap();
    assert_eq!((got.ids, got.type_ids), (vec![CLS, 8, SEP, SEP], vec![0, 0, 0, 1]));
}

#[test]
fn truncation_pops_the_longer_side_first() {
    let (_dir, t) = tiny("truncate");
    let six = "the quick brown fox hello world"; // 5 6 7 8 18 19
    // Budget 7 − 3 = 4 for 6 + 2 tokens: A loses 4, B keeps both.
    let got = t.encode_pair(six, Some("hello world"), 7).unwrap();
    assert_eq!(got.ids, [CLS, 5, 6, SEP, 18, 19, SEP]);
    assert_eq!(got.type_ids, [0, 0, 0, 0, 1, 1, 1]);
    // Equal lengths 4 + 4 in a budget of 5: B loses first on a tie → 3 + 2.
    let got = t.encode_pair("the quick brown fox", Some("hello world the fox"), 8).unwrap();
    assert_eq!(got.ids, [CLS, 5, 6, 7, SEP, 18, 19, SEP]);
    // A single text keeps its first max_len − 2 pieces (word pieces split across the cut).
    assert_eq!(t.encode_pair("unaffable fox", None, 4).unwrap(), single(&[9, 10]));
    assert_eq!(t.encode_pair("fox", Some("fox"), 3).unwrap().ids, [CLS, SEP, SEP]);
    // The result never exceeds max_len.
    for max_len in 3..12 {
        assert!(t.encode_pair(six, Some(six), max_len).unwrap().ids.len() <= max_len);
    }
    assert!(matches!(t.encode_pair("fox", Some("fox"), 2), Err(TokenizerError::MaxLen { .. })));
    assert!(matches!(t.encode_pair("fox", None, 1), Err(TokenizerError::MaxLen { .. })));
}

#[test]
fn a_vocabulary_without_special_tokens_is_an_error() {
    let vocab: Vec<&str> = VOCAB.iter().copied().filter(|&t| t != "[CLS]").collect();
    let dir = tiny_dir("no-cls", &vocab);
    let error = Tokenizer::from_dir(&dir.0).unwrap_err();
    assert!(matches!(error, TokenizerError::MissingToken { token: "[CLS]", .. }), "{error:?}");
    assert!(error.to_string().contains("vocab.txt"), "{error}");

    let empty = TempDir::new("tokenizer-none");
    assert!(matches!(Tokenizer::from_dir(&empty.0), Err(TokenizerError::NotFound { .. })));
    std::fs::write(empty.join("tokenizer.json"), "{ not json").unwrap();
    let error = Tokenizer::from_dir(&empty.0).unwrap_err();
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
}

/// A tokenizer.json with truncation to 4 and padding to 16 stored in it, built with the
/// tokenizers crate over the tiny vocabulary.
fn write_tokenizer_json(path: &Path, vocab: &Path) {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

    let model = WordPiece::from_file(vocab.to_str().unwrap()).unk_token("[UNK]".into()).build().unwrap();
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_normalizer(Some(BertNormalizer::default())).unwrap();
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    t.with_truncation(Some(TruncationParams { max_length: 4, ..Default::default() })).unwrap();
    t.with_padding(Some(PaddingParams { strategy: PaddingStrategy::Fixed(16), ..Default::default() }));
    t.save(path, false).unwrap();
}

#[test]
fn tokenizer_json_is_preferred_and_its_truncation_and_padding_are_ignored() {
    let (dir, from_vocab) = tiny("json");
    write_tokenizer_json(&dir.join("tokenizer.json"), &dir.join("vocab.txt"));
    let t = Tokenizer::from_dir(&dir.0).unwrap();
    assert!(t.source.ends_with("tokenizer.json"));
    let text = "The quick brown fox, running!";
    let got = t.encode_pair(text, Some("hello world"), 64).unwrap();
    assert_eq!(got.ids, [CLS, 5, 6, 7, 8, 14, 12, 13, 16, SEP, 18, 19, SEP]);
    assert_eq!(got, from_vocab.encode_pair(text, Some("hello world"), 64).unwrap());
}

// ---- the real tokenizer ------------------------------------------------------------------

/// Expected ids from the Python `tokenizers` package (0.23.3) on all-MiniLM-L6-v2's
/// tokenizer.json, with truncation and padding switched off:
///   t = Tokenizer.from_file("tokenizer.json"); t.no_truncation(); t.no_padding()
///   t.encode(text).ids                      # single texts, [CLS] … [SEP] included
///   e = t.encode(a, b); e.ids, e.type_ids   # the pair
/// and for the truncated pair: t.enable_truncation(max_length=12, strategy="longest_first").
const REAL_SINGLES: [(&str, &[u32]); 4] = [
    (
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        &[101, 7592, 1010, 2088, 999, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102],
    ),
    (
        "Unaffable naïve CAFÉ: résumé in Zürich, 3.14159 × 2 = 6.28",
        &[
            101, 14477, 20961, 3468, 15743, 7668, 1024, 13746, 1999, 10204, 1010, 1017, 1012, 15471, 28154,
            1095, 1016, 1027, 1020, 1012, 2654, 102,
        ],
    ),
    (
        "这是中文 mixed with English [SEP] tokens\ttabs\u{a0}nbsp",
        &[101, 100, 100, 1746, 1861, 3816, 2007, 2394, 102, 19204, 2015, 21628, 2015, 1050, 5910, 2361, 102],
    ),
    ("xqzvbnmwk", &[101, 1060, 4160, 2480, 26493, 2078, 2213, 26291, 102]),
];
const REAL_PAIR: (&str, &str, &[u32], &[u32]) = (
    "How old are you?",
    "I'm 6 years old, and you?",
    &[
        101, 2129, 2214, 2024, 2017, 1029, 102, 1045, 1005, 1049, 1020, 2086, 2214, 1010, 1998, 2017, 1029,
        102,
    ],
    &[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
);
const REAL_TRUNCATED: (&str, &str, usize, &[u32]) = (
    "The quick brown fox jumps over the lazy dog.",
    "How old?",
    12,
    &[101, 1996, 4248, 2829, 4419, 14523, 2058, 102, 2129, 2214, 1029, 102],
);

fn check_real(t: &Tokenizer) {
    for (text, ids) in REAL_SINGLES {
        assert_eq!(t.encode_pair(text, None, 512).unwrap(), single_real(ids), "{text:?} ({:?})", t.source);
    }
    let (a, b, ids, type_ids) = REAL_PAIR;
    assert_eq!(
        t.encode_pair(a, Some(b), 512).unwrap(),
        Encoded { ids: ids.to_vec(), type_ids: type_ids.to_vec() }
    );
    let (a, b, max_len, ids) = REAL_TRUNCATED;
    let got = t.encode_pair(a, Some(b), max_len).unwrap();
    assert_eq!(got.ids, ids);
    assert_eq!(got.type_ids, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
}

fn single_real(ids: &[u32]) -> Encoded {
    Encoded { ids: ids.to_vec(), type_ids: vec![0; ids.len()] }
}

#[test]
fn real_minilm_tokenizer_matches_python_tokenizers() {
    let Some(dir) = std::env::var_os("PALS_MODEL_DIR") else {
        eprintln!("PALS_MODEL_DIR not set: real-checkpoint test did not run");
        return;
    };
    let dir = PathBuf::from(dir);
    let from_json = Tokenizer::from_dir(&dir).unwrap();
    assert!(from_json.source.ends_with("tokenizer.json"));
    assert_eq!(
        (from_json.cls_id(), from_json.sep_id(), from_json.pad_id(), from_json.vocab_size()),
        (101, 102, 0, 30522)
    );
    check_real(&from_json);
    // The stored truncation (128) and padding (to 128) are off.
    let long = "word ".repeat(300);
    assert_eq!(from_json.encode_pair(&long, None, 1000).unwrap().ids.len(), 302);
    assert_eq!(from_json.encode_pair("hello", None, 512).unwrap().ids.len(), 3);

    // vocab.txt alone (no tokenizer_config.json: lower-casing by default) gives the same ids.
    let from_vocab = Tokenizer::from_vocab_txt(dir.join("vocab.txt"), BasicOptions::default()).unwrap();
    assert_eq!(from_vocab.vocab_size(), 30522);
    check_real(&from_vocab);
}
