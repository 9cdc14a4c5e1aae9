//! BertConfig, as Hugging Face's config.json states it.

use crate::error::LoadError;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// A tiny configuration for tests: `layers` layers of width `hidden`, `heads` heads.
    pub fn tiny(layers: usize, hidden: usize, heads: usize) -> BertConfig {
        BertConfig {
            vocab_size: 50,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden,
            hidden_act: "gelu".into(),
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
        }
    }

    /// BERT-base (uncased): 12 layers × 768, 12 heads.
    pub fn base() -> BertConfig {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 512,
            ..BertConfig::tiny(12, 768, 12)
        }
    }

    /// all-MiniLM-L6-v2: 6 layers × 384, 12 heads of 32.
    pub fn minilm() -> BertConfig {
        BertConfig { num_hidden_layers: 6, hidden_size: 384, intermediate_size: 1536, ..BertConfig::base() }
    }
}

/// Size limits, far above any BERT (BERT-large: 24 layers, 1024 wide, 30522 tokens), so a
/// config whose tensors could not exist is refused before anything is built.
pub const MAX_LAYERS: usize = 1024;
/// Kernels index a tensor with u32.
pub const MAX_TENSOR_ELEMENTS: u128 = u32::MAX as u128;
/// 2^34 parameters are 64 GiB of f32 before gradients and optimizer state.
pub const MAX_PARAMETERS: u128 = 1 << 34;

impl BertConfig {
    /// Refuses sizes whose tensors could not exist: too many layers, a tensor past u32
    /// indexing, or more parameters than any machine holds.
    fn check_sizes(&self) -> Result<(), ConfigError> {
        if self.num_hidden_layers > MAX_LAYERS {
            let message = format!("{} is above the limit of {MAX_LAYERS}", self.num_hidden_layers);
            return Err(ConfigError::new("num_hidden_layers", message));
        }
        let hidden = self.hidden_size as u128;
        let tables = [
            ("vocab_size", self.vocab_size as u128 * hidden),
            ("hidden_size", hidden * hidden),
            ("intermediate_size", self.intermediate_size as u128 * hidden),
            ("max_position_embeddings", self.max_position_embeddings as u128 * hidden),
            ("type_vocab_size", self.type_vocab_size as u128 * hidden),
        ];
        for (field, elements) in tables {
            if elements > MAX_TENSOR_ELEMENTS {
                let message = format!(
                    "a {field} × hidden_size tensor has {elements} elements, above the limit of \
                     {MAX_TENSOR_ELEMENTS}"
                );
                return Err(ConfigError::new(field, message));
            }
        }
        let per_layer = 4 * hidden * hidden + 2 * self.intermediate_size as u128 * hidden;
        let total = per_layer * self.num_hidden_layers as u128 + tables[0].1 + tables[3].1;
        if total > MAX_PARAMETERS {
            let message =
                format!("the model would have about {total} parameters, above the limit of {MAX_PARAMETERS}");
            return Err(ConfigError::new("num_hidden_layers", message));
        }
        Ok(())
    }
}

/// Activations we implement: both names Hugging Face uses for the exact erf GELU. The tanh and
/// sigmoid approximations ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", …) give
/// different outputs from the same weights, so they are refused rather than silently swapped.
pub const SUPPORTED_ACTS: [&str; 2] = ["gelu", "gelu_python"];

pub use crate::error::ConfigError;

const REQUIRED: [&str; 6] = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
];
const OPTIONAL_SIZES: [&str; 1] = ["type_vocab_size"];
const OPTIONAL_FLOATS: [&str; 3] = ["layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"];

impl BertConfig {
    /// Reads and validates a Hugging Face config.json. Errors name the file and the field;
    /// JSON syntax errors give line and column.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<BertConfig, LoadError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let bad = |error: ConfigError| LoadError::Config { path: path.to_path_buf(), error };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        BertConfig::from_json(&value).map_err(bad)
    }

    /// A validated configuration from config.json's parsed contents; unknown fields are ignored.
    pub fn from_json(value: &serde_json::Value) -> Result<BertConfig, ConfigError> {
        let object =
            value.as_object().ok_or_else(|| ConfigError::new("(top level)", "expected a JSON object"))?;
        for field in REQUIRED {
            if !object.contains_key(field) {
                return Err(ConfigError::new(field, "missing (required)"));
            }
        }
        for field in REQUIRED.iter().chain(&OPTIONAL_SIZES) {
            if let Some(v) = object.get(*field).filter(|v| v.as_u64().is_none()) {
                return Err(ConfigError::new(field, format!("expected a non-negative integer, found {v}")));
            }
        }
        for field in OPTIONAL_FLOATS {
            if let Some(v) = object.get(field).filter(|v| v.as_f64().is_none()) {
                return Err(ConfigError::new(field, format!("expected a number, found {v}")));
            }
        }
        for field in ["hidden_act", "model_type", "position_embedding_type"] {
            if let Some(v) = object.get(field).filter(|v| !v.is_string()) {
                return Err(ConfigError::new(field, format!("expected a string, found {v}")));
            }
        }
        let string = |field: &str| object.get(field).and_then(|v| v.as_str());
        if let Some(kind) = string("model_type").filter(|&k| k != "bert") {
            return Err(ConfigError::new(
                "model_type",
                format!("\"{kind}\" is not supported, only \"bert\""),
            ));
        }
        if let Some(kind) = string("position_embedding_type").filter(|&k| k != "absolute") {
            return Err(ConfigError::new(
                "position_embedding_type",
                format!("\"{kind}\" is not supported, only \"absolute\""),
            ));
        }
        let config: BertConfig =
            serde_json::from_value(value.clone()).map_err(|e| ConfigError::new("(config)", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the kernels rely on: non-zero sizes, heads dividing the width, the exact GELU,
    /// probabilities in [0, 1) and a positive LayerNorm epsilon.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be greater than 0"));
            }
        }
        self.check_sizes()?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::new(
                "hidden_size",
                format!(
                    "{} is not divisible by num_attention_heads = {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !SUPPORTED_ACTS.contains(&self.hidden_act.as_str()) {
            return Err(ConfigError::new(
                "hidden_act",
                format!(
                    "\"{}\" is not supported; only the exact (erf) GELU is implemented: {SUPPORTED_ACTS:?}",
                    self.hidden_act
                ),
            ));
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(ConfigError::new(field, format!("{p} is not in [0, 1)")));
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(ConfigError::new(
                "layer_norm_eps",
                format!("{} must be positive", self.layer_norm_eps),
            ));
        }
        Ok(())
    }
}
