//! Padded batches for the encoder, grouped by length so little of each batch is padding.
//!
//! Training order is the classic bucket sampler: shuffle all examples, sort each chunk of
//! [`BUCKET_BATCHES`] × B examples by length, cut the chunks into batches of B, shuffle the
//! batches. Each batch is padded to its own longest sequence (optionally rounded up to a
//! multiple, so few distinct shapes reach the GPU). Evaluation order is sequential, optionally
//! sorted by length; every batch keeps its examples' positions, and [`scatter`] puts
//! predictions back in file order. Shuffles draw from the counter RNG, so an order is a pure
//! function of the seed.

use super::cache::{TokenizedExample, TokenizedSplit};
use super::glue::Label;
use crate::contract::rng::rng_u32;
use crate::model::EncoderBatch;

/// Batches per sorted chunk: larger groups lengths better, smaller keeps more randomness.
pub const BUCKET_BATCHES: usize = 50;
const STREAM_EXAMPLES: u32 = 0xba7c_0001;
const STREAM_BATCHES: u32 = 0xba7c_0002;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOptions {
    /// B, the number of examples in a batch.
    pub batch_size: usize,
    /// Fill a short last batch up to B with weight-0 rows, so every batch has B rows.
    pub pad_to_batch: bool,
    /// Round S up to a multiple of this (1: no rounding; 8 keeps few distinct shapes).
    pub seq_multiple: usize,
    /// The token id of padding (BERT's `[PAD]` is 0).
    pub pad_id: u32,
}

impl BatchOptions {
    /// B examples a batch, no filling of the last batch, no rounding of S, pad id 0.
    pub fn new(batch_size: usize) -> BatchOptions {
        BatchOptions { batch_size, pad_to_batch: false, seq_multiple: 1, pad_id: 0 }
    }
}

/// Targets of a batch's rows; rows that only fill the batch get 0.
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// Test data.
    None,
    Class(Vec<u32>),
    Score(Vec<f32>),
}

#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, S]` ids, token types and mask (1 real token, 0 padding).
    pub encoder: EncoderBatch,
    pub labels: Labels,
    /// `[B]`: 1.0 for real rows, 0.0 for rows that only fill the batch.
    pub weights: Vec<f32>,
    /// The split positions of the real rows, which come first: row r is example `rows[r]`.
    pub rows: Vec<usize>,
}

impl Batch {
    /// Padding tokens (filler rows included) / B·S.
    pub fn padding_fraction(&self) -> f64 {
        let total = self.encoder.mask.len();
        if total == 0 {
            return 0.0;
        }
        1.0 - self.real_tokens() as f64 / total as f64
    }

    pub fn real_tokens(&self) -> usize {
        self.encoder.mask.iter().filter(|&&m| m != 0.0).count()
    }
}

/// Padding tokens / all tokens over `batches`.
pub fn padding_fraction(batches: &[Batch]) -> f64 {
    let total: usize = batches.iter().map(|b| b.encoder.mask.len()).sum();
    let real: usize = batches.iter().map(|b| b.real_tokens()).sum();
    if total == 0 { 0.0 } else { 1.0 - real as f64 / total as f64 }
}

/// A uniform integer in 0..n from 32 random bits (bias below n / 2³², negligible here).
fn below(bits: u32, n: usize) -> usize {
    ((bits as u64 * n as u64) >> 32) as usize
}

/// Fisher–Yates with draws from `rng_u32(seed, stream, i)`.
fn shuffle<T>(items: &mut [T], seed: u32, stream: u32) {
    for i in (1..items.len()).rev() {
        let j = below(rng_u32(seed, stream, i as u32), i + 1);
        items.swap(i, j);
    }
}

/// Training order: each inner Vec is one batch of example positions (only the last may be
/// short). Every example appears exactly once.
pub fn bucketed_order(lengths: &[usize], batch_size: usize, seed: u32) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, seed, STREAM_EXAMPLES);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch_size));
    for chunk in order.chunks_mut(BUCKET_BATCHES * batch_size) {
        // Stable: equal lengths keep their shuffled order.
        chunk.sort_by_key(|&i| lengths[i]);
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, seed, STREAM_BATCHES);
    batches
}

/// Evaluation order: file order, or sorted by length (stable) to waste less padding.
pub fn sequential_order(lengths: &[usize], batch_size: usize, by_length: bool) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if by_length {
        order.sort_by_key(|&i| lengths[i]);
    }
    order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

/// The padded batch of `examples[rows]`, S = the longest row rounded up to `seq_multiple`.
/// The labels' kind follows the first row; a split mixes no kinds.
pub fn make_batch(examples: &[TokenizedExample], rows: &[usize], options: &BatchOptions) -> Batch {
    let b = if options.pad_to_batch { rows.len().max(options.batch_size) } else { rows.len() };
    let longest = rows.iter().map(|&r| examples[r].ids.len()).max().unwrap_or(1).max(1);
    let s = longest.next_multiple_of(options.seq_multiple.max(1));
    let mut ids = vec![options.pad_id; b * s];
    let mut type_ids = vec![0; b * s];
    let mut mask = vec![0.0; b * s];
    for (row, &r) in rows.iter().enumerate() {
        let e = &examples[r];
        let n = e.ids.len();
        ids[row * s..row * s + n].copy_from_slice(&e.ids);
        type_ids[row * s..row * s + n].copy_from_slice(&e.type_ids);
        mask[row * s..row * s + n].fill(1.0);
    }
    let labels = match rows.first().and_then(|&r| examples[r].label) {
        None => Labels::None,
        Some(Label::Class(_)) => {
            Labels::Class((0..b).map(|row| rows.get(row).map_or(0, |&r| class(&examples[r].label))).collect())
        }
        Some(Label::Score(_)) => Labels::Score(
            (0..b).map(|row| rows.get(row).map_or(0.0, |&r| score(&examples[r].label))).collect(),
        ),
    };
    let mut weights = vec![0.0; b];
    weights[..rows.len()].fill(1.0);
    Batch {
        encoder: EncoderBatch { batch: b, seq: s, ids, type_ids, mask },
        labels,
        weights,
        rows: rows.to_vec(),
    }
}

fn class(label: &Option<Label>) -> u32 {
    match label {
        Some(Label::Class(c)) => *c,
        other => panic!("a batch mixes class labels with {other:?}"),
    }
}

fn score(label: &Option<Label>) -> f32 {
    match label {
        Some(Label::Score(s)) => *s,
        other => panic!("a batch mixes scores with {other:?}"),
    }
}

/// Every batch of `split` for evaluation (see [`sequential_order`]).
pub fn eval_batches(split: &TokenizedSplit, options: &BatchOptions, by_length: bool) -> Vec<Batch> {
    sequential_order(&split.lengths(), options.batch_size, by_length)
        .iter()
        .map(|rows| make_batch(&split.examples, rows, options))
        .collect()
}

/// Writes the predictions of `batch`'s real rows (`predictions[r]` for row r; filler rows
/// after them are ignored) to their split positions in `out`.
pub fn scatter<T: Copy>(batch: &Batch, predictions: &[T], out: &mut [T]) {
    for (&position, &p) in batch.rows.iter().zip(predictions) {
        out[position] = p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_permutation_and_depends_on_the_seed() {
        let mut a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        shuffle(&mut a, 1, 0);
        shuffle(&mut b, 2, 0);
        assert_ne!(a, b);
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        a.sort();
        assert_eq!(a, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn below_is_uniform_enough() {
        let mut counts = [0usize; 3];
        for i in 0..30000 {
            counts[below(rng_u32(7, 0, i), 3)] += 1;
        }
        assert!(counts.iter().all(|&c| (9500..10500).contains(&c)), "{counts:?}");
    }
}
