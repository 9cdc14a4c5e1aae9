//! Hugging Face checkpoints in and out: config.json and model.safetensors.
//!
//! Reading accepts what BERT checkpoints in the wild contain: names with or without the
//! `bert.` prefix, the old TensorFlow LayerNorm names `gamma`/`beta`, and F32, F16 or BF16
//! storage (converted to f32). Pretraining heads (`cls.*`) and the `embeddings.position_ids`
//! buffer are skipped. Every other difference from [`param_shapes`] is an error, and all of
//! them are reported together so one run shows everything that is wrong with a file.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use super::{BertConfig, HostTensor, Weights, param_shapes};
pub use crate::error::LoadError;

/// Reads `dir/config.json` and `dir/model.safetensors`, checked against each other.
pub fn load_model_dir(dir: impl AsRef<Path>) -> Result<(BertConfig, Weights), LoadError> {
    let dir = dir.as_ref();
    let config = BertConfig::from_file(dir.join("config.json"))?;
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        if dir.join("pytorch_model.bin").exists() {
            return Err(LoadError::PytorchOnly { dir: dir.to_path_buf() });
        }
        return Err(LoadError::NoWeights { dir: dir.to_path_buf() });
    }
    let weights = load_weights(&weights_path, &config)?;
    Ok((config, weights))
}

/// The encoder and pooler weights of a safetensors file, named and shaped as [`param_shapes`].
pub fn load_weights(path: impl AsRef<Path>, config: &BertConfig) -> Result<Weights, LoadError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    let file = parse(path, &bytes)?;

    let expected: BTreeMap<String, Vec<usize>> = param_shapes(config).into_iter().collect();
    let mut weights = Weights::new();
    let mut seen = BTreeSet::new();
    let (mut wrong, mut unexpected) = (Vec::new(), Vec::new());
    let mut ignored = 0;
    for (stored, view) in file.iter() {
        let name = canonical_name(stored);
        if is_ignored(&name) {
            ignored += 1;
            continue;
        }
        let Some(shape) = expected.get(&name) else {
            unexpected.push(format!("  unexpected  {stored}: found {:?}", view.shape()));
            continue;
        };
        if !seen.insert(name.clone()) {
            wrong.push(format!("  duplicate   {stored}: {name} is stored under two names"));
        } else if view.shape() != shape.as_slice() {
            wrong.push(format!("  mis-shaped  {stored}: expected {shape:?}, found {:?}", view.shape()));
        } else if let Some(data) = to_f32(&view) {
            weights.insert(name, HostTensor::new(shape, data));
        } else {
            wrong.push(bad_dtype(stored, &view));
        }
    }
    let missing = expected
        .iter()
        .filter(|(name, _)| !seen.contains(*name))
        .map(|(name, shape)| format!("  missing     {name}: expected {shape:?}"));
    let problems: Vec<String> = missing.chain(wrong).chain(unexpected).collect();
    if !problems.is_empty() {
        return Err(LoadError::Mismatch { path: path.to_path_buf(), problems });
    }
    if ignored > 0 {
        eprintln!(
            "info: {}: ignored {ignored} tensor(s) the encoder does not use (cls.* pretraining heads, \
             embeddings.position_ids)",
            path.display()
        );
    }
    Ok(weights)
}

/// Every tensor of a safetensors file as f32, under its stored name, without checking it
/// against any configuration (checkpoints that hold task heads as well as the encoder).
pub fn read_tensors(path: impl AsRef<Path>) -> Result<Weights, LoadError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    let file = parse(path, &bytes)?;
    let mut weights = Weights::new();
    let mut problems = Vec::new();
    for (name, view) in file.iter() {
        match to_f32(&view) {
            Some(data) => {
                weights.insert(name.to_string(), HostTensor::new(view.shape(), data));
            }
            None => problems.push(bad_dtype(name, &view)),
        }
    }
    if !problems.is_empty() {
        return Err(LoadError::Mismatch { path: path.to_path_buf(), problems });
    }
    Ok(weights)
}

/// Writes `weights` as an F32 safetensors file, atomically: a temporary file beside `path`,
/// flushed to disk, then renamed over it, so a crash never leaves a half-written checkpoint.
pub fn save_weights(path: impl AsRef<Path>, weights: &Weights) -> Result<(), LoadError> {
    let path = path.as_ref();
    let file_name = path.file_name().ok_or_else(|| {
        LoadError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))
    })?;
    let temp = path.with_file_name(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let views = weights.iter().map(|(name, t)| (name.as_str(), F32View { shape: &t.shape, data: &t.data }));
    // transformers refuses safetensors files whose metadata lacks a format.
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    let written = safetensors::serialize_to_file(views, metadata, &temp)
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })
        .and_then(|()| std::fs::File::open(&temp)?.sync_all())
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(LoadError::io(path, e));
    }
    Ok(())
}

fn bad_dtype(name: &str, view: &TensorView) -> String {
    format!("  bad dtype   {name}: {:?}, expected F32, F16 or BF16", view.dtype())
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, LoadError> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| LoadError::Safetensors { path: path.to_path_buf(), message: e.to_string() })
}

/// The name in [`param_shapes`]'s convention: no `bert.` prefix, LayerNorm `weight`/`bias`.
fn canonical_name(stored: &str) -> String {
    let name = stored.strip_prefix("bert.").unwrap_or(stored);
    if name.contains("LayerNorm.") {
        if let Some(stem) = name.strip_suffix(".gamma") {
            return format!("{stem}.weight");
        }
        if let Some(stem) = name.strip_suffix(".beta") {
            return format!("{stem}.bias");
        }
    }
    name.to_string()
}

fn is_ignored(name: &str) -> bool {
    name.starts_with("cls.") || name == "embeddings.position_ids"
}

/// The values as f32; None for a dtype other than F32, F16 or BF16.
fn to_f32(view: &TensorView) -> Option<Vec<f32>> {
    let bytes = view.data();
    Some(match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        _ => return None,
    })
}

/// An f32 tensor borrowed for serialisation; safetensors stores little-endian.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_canonicalised() {
        assert_eq!(canonical_name("bert.embeddings.LayerNorm.gamma"), "embeddings.LayerNorm.weight");
        assert_eq!(
            canonical_name("encoder.layer.3.output.LayerNorm.beta"),
            "encoder.layer.3.output.LayerNorm.bias"
        );
        assert_eq!(canonical_name("pooler.dense.weight"), "pooler.dense.weight");
        assert!(is_ignored(&canonical_name("bert.embeddings.position_ids")));
        assert!(is_ignored("cls.predictions.bias"));
    }
}
