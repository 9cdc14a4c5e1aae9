//! Sentence embeddings with a BERT checkpoint: `pals encode`. With all-MiniLM-L6-v2 and
//! mean pooling this is that model's real use.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::data::Tokenizer;
use crate::gpu::Gpu;
use crate::model::bert::{Activations, BatchInputs, Bert};
use crate::model::{BertConfig, EncoderBatch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pooling {
    /// The [CLS] token's final hidden state.
    Cls,
    /// The mean of the final hidden states of the real tokens (sentence-transformers).
    Mean,
    /// BERT's pooler: tanh(W·h_CLS + b).
    Pooler,
}

/// A model ready to embed text: tokenizer, weights on the GPU, buffers per shape.
pub struct Encoder<'g> {
    gpu: &'g Gpu,
    pub tokenizer: Tokenizer,
    pub bert: Bert,
    buffers: HashMap<(usize, usize), (Activations, BatchInputs)>,
}

impl<'g> Encoder<'g> {
    pub fn from_dir(gpu: &'g Gpu, dir: &Path) -> Result<Encoder<'g>> {
        let (config, weights) = crate::model::load::load_model_dir(dir)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        tokenizer.check_fits(config.vocab_size)?;
        let bert = Bert::upload_inference(gpu, &config, &weights)?;
        Ok(Encoder { gpu, tokenizer, bert, buffers: HashMap::new() })
    }

    pub fn config(&self) -> &BertConfig {
        &self.bert.config
    }

    /// Tokens per text when the caller does not say: 128, or the model's limit if lower.
    pub fn default_max_length(&self) -> usize {
        128.min(self.config().max_position_embeddings)
    }

    /// One embedding per text, in order; batches of `batch_size`, each padded to its own
    /// longest text (rounded up to a multiple of 8 so few buffer sets are needed).
    pub fn encode(
        &mut self,
        texts: &[String],
        pooling: Pooling,
        batch_size: usize,
        max_len: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let limit = self.config().max_position_embeddings;
        if max_len > limit {
            bail!(
                "--max-length {max_len} is more than this model's {limit} positions (max_position_embeddings)"
            );
        }
        let mut encoded = Vec::with_capacity(texts.len());
        for (line, text) in texts.iter().enumerate() {
            let e = self
                .tokenizer
                .encode_pair(text, None, max_len)
                .with_context(|| format!("input line {}", line + 1))?;
            encoded.push(e);
        }
        let mut out = Vec::with_capacity(texts.len());
        for chunk in encoded.chunks(batch_size.max(1)) {
            let longest = chunk.iter().map(|e| e.ids.len()).max().unwrap_or(1);
            let seq = longest.div_ceil(8).max(1) * 8;
            let seq = seq.min(max_len).max(longest);
            let batch = EncoderBatch {
                batch: chunk.len(),
                seq,
                ids: pad(chunk.iter().map(|e| &e.ids[..]), seq, self.tokenizer.pad_id()),
                type_ids: pad(chunk.iter().map(|e| &e.type_ids[..]), seq, 0),
                mask: chunk
                    .iter()
                    .flat_map(|e| (0..seq).map(move |i| if i < e.ids.len() { 1.0 } else { 0.0 }))
                    .collect(),
            };
            out.extend(self.embed_batch(&batch, pooling)?);
        }
        Ok(out)
    }

    fn embed_batch(&mut self, batch: &EncoderBatch, pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let (gpu, bert) = (self.gpu, &self.bert);
        let key = (batch.batch, batch.seq);
        let (acts, inputs) = match self.buffers.entry(key) {
            Entry::Occupied(found) => found.into_mut(),
            Entry::Vacant(slot) => {
                let acts = bert.activations(gpu, batch.batch, batch.seq)?;
                slot.insert((acts, BatchInputs::new(gpu, &bert.config, batch.batch, batch.seq)?))
            }
        };
        inputs.write(gpu, batch)?;
        let mut rec = gpu.recorder();
        bert.forward(&mut rec, acts, inputs, None)?;
        rec.submit()?;
        read_embeddings(gpu, acts, batch, pooling)
    }
}

/// One embedding per row of `batch` from the encoder's outputs in `acts` (after its forward).
pub fn read_embeddings(
    gpu: &Gpu,
    acts: &Activations,
    batch: &EncoderBatch,
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>> {
    if pooling == Pooling::Pooler {
        let pooled: Vec<f32> = gpu.read(&acts.pooled)?;
        return Ok(pooled.chunks(pooled.len() / batch.batch).map(<[f32]>::to_vec).collect());
    }
    let last = acts.hidden.last().expect("at least the embeddings' output");
    let states: Vec<f32> = gpu.read(last)?;
    let hidden = states.len() / (batch.batch * batch.seq);
    Ok((0..batch.batch).map(|b| pool(&states, &batch.mask, b, batch.seq, hidden, pooling)).collect())
}

fn pad<'a>(rows: impl Iterator<Item = &'a [u32]>, seq: usize, value: u32) -> Vec<u32> {
    rows.flat_map(|row| row.iter().copied().chain(std::iter::repeat(value)).take(seq)).collect()
}

/// Sequence `b`'s embedding from the final hidden states [B, S, H].
fn pool(states: &[f32], mask: &[f32], b: usize, seq: usize, hidden: usize, pooling: Pooling) -> Vec<f32> {
    let row = |s: usize| &states[(b * seq + s) * hidden..][..hidden];
    if pooling == Pooling::Cls {
        return row(0).to_vec();
    }
    let mut sum = vec![0.0f64; hidden];
    let mut count = 0.0f64;
    for s in 0..seq {
        let weight = mask[b * seq + s] as f64;
        if weight > 0.0 {
            count += weight;
            for (acc, &v) in sum.iter_mut().zip(row(s)) {
                *acc += weight * v as f64;
            }
        }
    }
    sum.iter().map(|v| (v / count.max(1e-9)) as f32).collect()
}

/// Scales each embedding to unit length (sentence-transformers' Normalize).
pub fn normalize(embeddings: &mut [Vec<f32>]) {
    for e in embeddings {
        let norm = e.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
        e.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}

/// JSON lines: one array per embedding.
pub fn write_jsonl(out: &mut dyn Write, embeddings: &[Vec<f32>]) -> Result<()> {
    for e in embeddings {
        serde_json::to_writer(&mut *out, e)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// NumPy .npy (format 1.0): a little-endian f32 array [N, H].
pub fn write_npy(out: &mut dyn Write, embeddings: &[Vec<f32>]) -> Result<()> {
    let width = embeddings.first().map_or(0, Vec::len);
    if embeddings.iter().any(|e| e.len() != width) {
        bail!("embeddings of different widths");
    }
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {width}), }}", embeddings.len());
    // Magic (6) + version (2) + length (2) + header + newline: a multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    header.push('\n');
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for e in embeddings {
        for v in e {
            out.write_all(&v.to_le_bytes())?;
        }
    }
    Ok(())
}
