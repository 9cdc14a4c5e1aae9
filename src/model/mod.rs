//! The BERT encoder: configuration, named parameters, and the forward/backward as ordered
//! kernel calls.
//!
//! # The contract shared by the GPU model and the CPU reference (src/reference/bert.rs)
//! Parameters use Hugging Face's BertModel names without the `bert.` prefix (see
//! [`param_shapes`]); Linear weights are [out, in]. For a batch of B padded sequences of
//! length S (ids, token types, attention mask 1/0, all [B, S]):
//!
//! ```text
//! h0  = Dropout_0(LN_emb(word[id] + pos[s] + type[tt]))
//! per layer l (input h):
//!   q, k, v = h·Wqᵀ + bq, h·Wkᵀ + bk, h·Wvᵀ + bv        [B·S, H] = [B, S, heads, d]
//!   ctx = softmax(q·kᵀ/√d + (1 − mask)·(−10000)) with Dropout_attn(l) · v
//!   a   = LN1(Dropout_ao(l)(ctx·Woᵀ + bo) + h)
//!   out = LN2(Dropout_ffn(l)(GELU(a·W1ᵀ + b1)·W2ᵀ + b2) + a)
//! sequence output = out of the last layer; pooled = tanh(seq[:, 0, :]·Wpᵀ + bp)
//! ```
//! Dropout draws from the counter RNG with stream = `dropout_stream(step, site)` and the
//! element index in row-major order of the tensor it applies to (attention probabilities:
//! ((b·heads + h)·S + i)·S + j). Sites: [`SITE_EMBEDDINGS`], then per layer l
//! [`site`]`(l, Site::…)`. Hidden dropout uses `hidden_dropout_prob`, attention dropout
//! `attention_probs_dropout_prob`.
//!
//! Multi-task training adds task-specific terms inside the layers and per-task heads:
//! model/tasks.rs (the methods, their parameter names and the step) and
//! reference/tasks.rs.

pub mod bert;
pub mod blocks;
pub mod config;
pub mod hook;
pub mod inputs;
pub mod load;
pub mod memory;
pub mod tasks;

pub use crate::contract::{DropoutKey, SITE_EMBEDDINGS, SITE_HEAD, Site, dropout_stream, site};
pub use config::BertConfig;

/// A host-side tensor: shape and f32 data, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: &[usize], data: Vec<f32>) -> HostTensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "HostTensor shape {shape:?}");
        HostTensor { shape: shape.to_vec(), data }
    }

    pub fn zeros(shape: &[usize]) -> HostTensor {
        HostTensor::new(shape, vec![0.0; shape.iter().product()])
    }
}

/// A batch of B padded sequences of length S for the encoder, row-major [B, S].
#[derive(Clone, Debug)]
pub struct EncoderBatch {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// 1.0 for real tokens, 0.0 for padding.
    pub mask: Vec<f32>,
}

impl EncoderBatch {
    /// The additive attention mask BERT uses: (1 − mask)·(−10000).
    pub fn additive_mask(&self) -> Vec<f32> {
        self.mask.iter().map(|&m| (1.0 - m) * -10000.0).collect()
    }
}

/// Named parameters (or gradients), in a stable order.
pub type Weights = std::collections::BTreeMap<String, HostTensor>;

/// Every parameter of the encoder and pooler with its shape, in Hugging Face's names.
pub fn param_shapes(c: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut shapes = vec![
        ("embeddings.word_embeddings.weight".to_string(), vec![c.vocab_size, h]),
        ("embeddings.position_embeddings.weight".to_string(), vec![c.max_position_embeddings, h]),
        ("embeddings.token_type_embeddings.weight".to_string(), vec![c.type_vocab_size, h]),
        ("embeddings.LayerNorm.weight".to_string(), vec![h]),
        ("embeddings.LayerNorm.bias".to_string(), vec![h]),
    ];
    for l in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for (name, shape) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![i, h]),
            ("intermediate.dense.bias", vec![i]),
            ("output.dense.weight", vec![h, i]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            shapes.push((format!("{p}{name}"), shape));
        }
    }
    shapes.push(("pooler.dense.weight".to_string(), vec![h, h]));
    shapes.push(("pooler.dense.bias".to_string(), vec![h]));
    shapes
}

/// Random weights as BERT initialises them: N(0, 0.02) weights (a uniform of the same
/// variance here, from the counter RNG), zero biases, LayerNorm γ = 1 and β = 0.
pub fn random_weights(c: &BertConfig, seed: u32) -> Weights {
    param_shapes(c)
        .into_iter()
        .enumerate()
        .map(|(index, (name, shape))| {
            let len = shape.iter().product();
            let data = if name.contains("LayerNorm.weight") {
                vec![1.0; len]
            } else if name.ends_with(".bias") || name.contains("LayerNorm.bias") {
                vec![0.0; len]
            } else {
                // Uniform on [-a, a] has standard deviation a/√3.
                crate::contract::random_vec(len, seed.wrapping_add(index as u32 * 7919), 0.02 * 3f32.sqrt())
            };
            (name, HostTensor::new(&shape, data))
        })
        .collect()
}

/// Parameters of the encoder and pooler.
pub fn param_count(c: &BertConfig) -> usize {
    param_shapes(c).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_base_has_the_papers_parameter_count() {
        assert_eq!(param_count(&BertConfig::base()), 109_482_240);
    }
}
