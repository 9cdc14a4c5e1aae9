//! BERT's WordPiece tokenizer, from a model directory: `tokenizer.json` (Hugging Face's fast
//! tokenizer format) when present, else `vocab.txt` with BERT's basic tokenizer (cleanup,
//! optional lower-casing and accent stripping, punctuation and CJK splitting) in front.
//!
//! Both go through the `tokenizers` crate, and both are used the same way: text → word-piece
//! ids without special tokens; [`Tokenizer::encode_pair`] then truncates and packs
//! `[CLS] A [SEP] (B [SEP])` itself, so settings stored in a tokenizer.json (truncation,
//! padding, post-processor) never change what the model sees.

use std::path::{Path, PathBuf};

use tokenizers::AddedToken;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;

pub const CLS: &str = "[CLS]";
pub const SEP: &str = "[SEP]";
pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
const MASK: &str = "[MASK]";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    // The cause is in the message, not chained as a source: printed once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: the vocabulary has no {token} token")]
    MissingToken { path: PathBuf, token: &'static str },
    #[error("{dir}: neither tokenizer.json nor vocab.txt found")]
    NotFound { dir: PathBuf },
    #[error("cannot tokenize {text:?}: {message}")]
    Encode { text: String, message: String },
    #[error("max_len {max_len} leaves no room for the {specials} special tokens")]
    MaxLen { max_len: usize, specials: usize },
    #[error(
        "config error: the tokenizer {path} has {tokens} tokens but the model's vocab_size is {vocab_size}: \
         ids from {vocab_size} on would have no embedding"
    )]
    VocabTooLarge { path: PathBuf, tokens: usize, vocab_size: usize },
}

/// One packed sequence: `[CLS] A [SEP] (B [SEP])` and its token types (0 for A, 1 for B).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// How `vocab.txt` text is normalised before WordPiece (tokenizer_config.json's fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BasicOptions {
    pub do_lower_case: bool,
    /// None: strip accents exactly when lower-casing (BERT's rule).
    pub strip_accents: Option<bool>,
    pub tokenize_chinese_chars: bool,
}

impl Default for BasicOptions {
    fn default() -> BasicOptions {
        BasicOptions { do_lower_case: true, strip_accents: None, tokenize_chinese_chars: true }
    }
}

#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    cls: u32,
    sep: u32,
    pad: u32,
    /// The file the vocabulary came from, for messages.
    pub source: PathBuf,
}

impl Tokenizer {
    /// `dir/tokenizer.json` if it exists, else `dir/vocab.txt` with the options of
    /// `dir/tokenizer_config.json` (defaults when absent).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Tokenizer::from_tokenizer_json(json);
        }
        let vocab = dir.join("vocab.txt");
        if !vocab.exists() {
            return Err(TokenizerError::NotFound { dir: dir.to_path_buf() });
        }
        let options = read_options(&dir.join("tokenizer_config.json"))?;
        Tokenizer::from_vocab_txt(vocab, options)
    }

    /// A Hugging Face tokenizer.json, with its truncation and padding switched off.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|error| TokenizerError::Io { path: path.to_path_buf(), error })?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| invalid(path, e))?;
        inner.with_truncation(None).map_err(|e| invalid(path, e))?;
        inner.with_padding(None);
        Tokenizer::new(inner, path)
    }

    /// A BERT vocab.txt (one token a line, the id is the line number) as a WordPiece tokenizer.
    pub fn from_vocab_txt(
        path: impl AsRef<Path>,
        options: BasicOptions,
    ) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|error| TokenizerError::Io { path: path.to_path_buf(), error })?;
        let vocab = WordPiece::read_bytes(&bytes).map_err(|e| invalid(path, e))?;
        if !vocab.contains_key(UNK) {
            return Err(TokenizerError::MissingToken { path: path.to_path_buf(), token: UNK });
        }
        let model =
            WordPiece::builder().vocab(vocab).unk_token(UNK.into()).build().map_err(|e| invalid(path, e))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        let normalizer = BertNormalizer::new(
            true,
            options.tokenize_chinese_chars,
            options.strip_accents,
            options.do_lower_case,
        );
        inner.with_normalizer(Some(normalizer)).map_err(|e| invalid(path, e))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        // As Hugging Face's BertTokenizer: special tokens in the text are kept whole.
        let specials: Vec<AddedToken> = [PAD, UNK, CLS, SEP, MASK]
            .into_iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| invalid(path, e))?;
        Tokenizer::new(inner, path)
    }

    fn new(inner: tokenizers::Tokenizer, path: &Path) -> Result<Tokenizer, TokenizerError> {
        let id = |token| {
            inner.token_to_id(token).ok_or(TokenizerError::MissingToken { path: path.to_path_buf(), token })
        };
        for token in [UNK, PAD] {
            id(token)?;
        }
        Ok(Tokenizer { cls: id(CLS)?, sep: id(SEP)?, pad: id(PAD)?, inner, source: path.to_path_buf() })
    }

    /// Word-piece ids of `text`, no special tokens, no truncation.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode { text: text.to_string(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` in at most `max_len` tokens, token type 0 up to
    /// the first [SEP] and 1 after. Too long: tokens are dropped from the end of the longer
    /// side, one at a time (B on a tie), as the original BERT does for GLUE. No padding.
    pub fn encode_pair(&self, a: &str, b: Option<&str>, max_len: usize) -> Result<Encoded, TokenizerError> {
        let specials = if b.is_some() { 3 } else { 2 };
        if max_len < specials {
            return Err(TokenizerError::MaxLen { max_len, specials });
        }
        let mut first = self.tokenize(a)?;
        let mut second = match b {
            Some(b) => self.tokenize(b)?,
            None => Vec::new(),
        };
        truncate_longest_first(&mut first, &mut second, max_len - specials);

        let mut ids = Vec::with_capacity(first.len() + second.len() + specials);
        ids.push(self.cls);
        ids.extend(&first);
        ids.push(self.sep);
        let mut type_ids = vec![0; ids.len()];
        if b.is_some() {
            ids.extend(&second);
            ids.push(self.sep);
            type_ids.resize(ids.len(), 1);
        }
        Ok(Encoded { ids, type_ids })
    }

    pub fn cls_id(&self) -> u32 {
        self.cls
    }

    pub fn sep_id(&self) -> u32 {
        self.sep
    }

    /// The id batching pads with.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids run from 0 to vocab_size − 1 (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Every id the tokenizer can produce has a row in an embedding of `vocab_size` rows.
    pub fn check_fits(&self, vocab_size: usize) -> Result<(), TokenizerError> {
        let tokens = self.vocab_size();
        if tokens > vocab_size {
            return Err(TokenizerError::VocabTooLarge { path: self.source.clone(), tokens, vocab_size });
        }
        Ok(())
    }
}

/// Drops tokens from the end of the longer list (the second on a tie) until both fit `budget`.
fn truncate_longest_first(a: &mut Vec<u32>, b: &mut Vec<u32>, budget: usize) {
    while a.len() + b.len() > budget {
        if a.len() > b.len() {
            a.pop();
        } else {
            b.pop();
        }
    }
}

fn invalid(path: &Path, error: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Invalid { path: path.to_path_buf(), message: error.to_string() }
}

/// The basic-tokenizer options of a tokenizer_config.json; defaults when the file is absent.
fn read_options(path: &Path) -> Result<BasicOptions, TokenizerError> {
    let mut options = BasicOptions::default();
    if !path.exists() {
        return Ok(options);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|error| TokenizerError::Io { path: path.to_path_buf(), error })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(path, e))?;
    let flag = |field: &str| match value.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => {
            v.as_bool().map(Some).ok_or_else(|| invalid(path, format!("`{field}` is not true or false")))
        }
    };
    if let Some(lower) = flag("do_lower_case")? {
        options.do_lower_case = lower;
    }
    options.strip_accents = flag("strip_accents")?;
    if let Some(cjk) = flag("tokenize_chinese_chars")? {
        options.tokenize_chinese_chars = cjk;
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_first_pops_the_longer_side_and_b_on_ties() {
        let (mut a, mut b) = ((0..10).collect::<Vec<u32>>(), (100..110).collect::<Vec<u32>>());
        truncate_longest_first(&mut a, &mut b, 15);
        assert_eq!((a.len(), b.len()), (8, 7));
        let (mut a, mut b) = ((0..3).collect::<Vec<u32>>(), (100..110).collect::<Vec<u32>>());
        truncate_longest_first(&mut a, &mut b, 8);
        assert_eq!((a, b), (vec![0, 1, 2], (100..105).collect()));
    }
}
