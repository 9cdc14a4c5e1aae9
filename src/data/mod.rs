//! Text in: tokenizers for BERT's WordPiece vocabulary.

pub mod tokenizer;

pub use tokenizer::{Encoded, Tokenizer, TokenizerError};
