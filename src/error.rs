//! The errors of building and loading a model, each saying what kind it is and naming the
//! file, field or tensor it concerns. Kernel and device problems stay `GpuError`
//! (src/gpu/); these wrap it where a model is built on the GPU.

use std::path::{Path, PathBuf};

use crate::gpu::GpuError;

/// A config.json field that is missing, of the wrong type, or out of range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { field: field.to_string(), message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // Causes are in the messages, not chained as sources: printed once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{path}: {error}")]
    Config { path: PathBuf, error: ConfigError },
    #[error("{path}: not a readable safetensors file, it may be truncated or corrupt ({message})")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: the tensors do not match the configuration:\n{}", .problems.join("\n"))]
    Mismatch { path: PathBuf, problems: Vec<String> },
    #[error(
        "{dir}: only pytorch_model.bin was found; pals reads safetensors. Convert it once with Python:\n  \
         python -c \"from transformers import BertModel; \
         BertModel.from_pretrained('{dir}').save_pretrained('{dir}', safe_serialization=True)\"\n\
         or, with only torch and safetensors installed:\n  \
         python -c \"import torch; from safetensors.torch import save_file; \
         sd = torch.load('{dir}/pytorch_model.bin', map_location='cpu'); \
         save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, '{dir}/model.safetensors', \
         metadata={{'format': 'pt'}})\""
    )]
    PytorchOnly { dir: PathBuf },
    #[error("{dir}: no model.safetensors found")]
    NoWeights { dir: PathBuf },
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> LoadError {
        LoadError::Io { path: path.to_path_buf(), error: source }
    }
}

/// Building a model on the GPU: what is wrong with the configuration, the method, the
/// weights or the tasks (each naming the field, tensor or task), or the GPU itself.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model configuration value the GPU model cannot run (e.g. hidden_act).
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    /// A method whose sizes do not fit (e.g. heads not dividing the width).
    #[error("method {method}: {message}")]
    Method { method: String, message: String },
    /// A tensor missing from the weights or of the wrong shape.
    #[error("weights: tensor '{name}' {message}")]
    Weights { name: String, message: String },
    /// A task that cannot be built (duplicate name, no outputs, unknown).
    #[error("task '{task}': {message}")]
    Task { task: String, message: String },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

impl ModelError {
    pub(crate) fn config(field: &str, message: impl Into<String>) -> ModelError {
        ModelError::Config { field: field.into(), message: message.into() }
    }

    pub(crate) fn method(method: &str, message: impl Into<String>) -> ModelError {
        ModelError::Method { method: method.into(), message: message.into() }
    }

    pub(crate) fn weights(name: &str, message: impl Into<String>) -> ModelError {
        ModelError::Weights { name: name.into(), message: message.into() }
    }

    pub(crate) fn task(task: &str, message: impl Into<String>) -> ModelError {
        ModelError::Task { task: task.into(), message: message.into() }
    }
}
