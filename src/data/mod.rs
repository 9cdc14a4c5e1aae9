//! Text in: tokenizers for BERT's WordPiece vocabulary, GLUE's files and custom tasks' files,
//! a tokenization cache,
//! length-bucketed batches and multi-task sampling.

pub mod batch;
pub mod cache;
pub mod custom;
pub mod glue;
pub mod sampler;
pub mod source;
pub mod tokenizer;

pub use tokenizer::{Encoded, Tokenizer, TokenizerError};
