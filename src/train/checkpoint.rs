//! Checkpoints: a directory holding the run configuration, the model config and tokenizer
//! (so `eval`/`predict` need no original model directory), `shared.safetensors` (encoder +
//! pooler, stored once), `tasks/<TASK>.safetensors` (each task's own parameters and head),
//! and for `--resume` the optimizer moments and the trainer state.
//!
//! A checkpoint is written into `<name>.partial/` and then swapped in with directory
//! renames (see `rundir`), so an interrupted save never damages the checkpoint that was
//! there before.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::load::{read_tensors, save_weights};
use crate::model::{BertConfig, Weights};
use crate::train::rundir::{COMPLETE, sibling, swap_in, sync_dir};

/// Where training stands: enough, with the run config, to continue bit for bit.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: u64,
    /// Each tensor's Adam step count.
    pub adam_steps: BTreeMap<String, u32>,
    /// Best GLUE average so far and the step it was reached at.
    pub best_score: Option<f64>,
    pub best_step: Option<u64>,
    /// Evaluations done.
    pub evals: u64,
    /// The data-parallel ranks that trained it (0 in checkpoints from before this was kept).
    #[serde(default)]
    pub ranks: usize,
    /// Mixed precision: the loss scaler where the run stopped (absent in f32 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<ScalerState>,
    /// Mixed precision: steps skipped because their scaled gradients overflowed.
    #[serde(default)]
    pub skipped_steps: u64,
}

/// The dynamic loss scale and its count of clean steps since it last changed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub scale: f32,
    pub growth: u32,
}

/// Everything a checkpoint holds.
pub struct Checkpoint {
    /// The `pals train` settings (JSON), kept as given.
    pub run: serde_json::Value,
    pub config: BertConfig,
    pub shared: Weights,
    pub tasks: BTreeMap<String, Weights>,
    /// Optimizer moments ("<param>.m", "<param>.v"); absent in a model-only checkpoint.
    pub optimizer: Option<Weights>,
    pub state: TrainerState,
}

const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "vocab.txt", "tokenizer_config.json"];

fn json_to(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn json_from<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl Checkpoint {
    /// Writes the checkpoint as `dir`, replacing what was there only once it is complete.
    /// `tokenizer_dir` is where the tokenizer files are copied from.
    pub fn save(&self, dir: &Path, tokenizer_dir: &Path) -> Result<()> {
        let partial = sibling(dir, "partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
        }
        std::fs::create_dir_all(partial.join("tasks"))
            .with_context(|| format!("creating {}", partial.display()))?;
        json_to(&partial.join("run.json"), &self.run)?;
        json_to(&partial.join("config.json"), &self.config)?;
        json_to(&partial.join("trainer_state.json"), &self.state)?;
        for file in TOKENIZER_FILES {
            let from = tokenizer_dir.join(file);
            if from.exists() && from != partial.join(file) {
                std::fs::copy(&from, partial.join(file))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
        }
        save_weights(partial.join("shared.safetensors"), &self.shared)?;
        for (task, weights) in &self.tasks {
            save_weights(partial.join("tasks").join(format!("{task}.safetensors")), weights)?;
        }
        if let Some(optimizer) = &self.optimizer {
            save_weights(partial.join("optimizer.safetensors"), optimizer)?;
        }
        // Recovery after a crash trusts a `.partial` only with this marker, so every file
        // must be on disk before it is.
        sync_files(&partial)?;
        let marker = partial.join(COMPLETE);
        std::fs::File::create(&marker)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", marker.display()))?;
        sync_dir(&partial)?;
        swap_in(&partial, dir)
    }

    /// Reads a checkpoint directory; `with_optimizer` also reads the optimizer state.
    pub fn load(dir: &Path, with_optimizer: bool) -> Result<Checkpoint> {
        if !dir.join("shared.safetensors").exists() {
            bail!("{} is not a pals checkpoint (no shared.safetensors)", dir.display());
        }
        let run = json_from(&dir.join("run.json"))?;
        let config_path = dir.join("config.json");
        let config: BertConfig = json_from(&config_path)?;
        config.validate().map_err(|e| anyhow::anyhow!("config error: {}: {e}", config_path.display()))?;
        let state = json_from(&dir.join("trainer_state.json"))?;
        let shared = read_tensors(dir.join("shared.safetensors"))?;
        let mut tasks = BTreeMap::new();
        let task_dir = dir.join("tasks");
        let entries =
            std::fs::read_dir(&task_dir).with_context(|| format!("reading {}", task_dir.display()))?;
        for entry in entries {
            let path = entry.with_context(|| format!("reading {}", task_dir.display()))?.path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                let name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
                tasks.insert(name, read_tensors(&path)?);
            }
        }
        let optimizer = match with_optimizer {
            true => Some(read_tensors(dir.join("optimizer.safetensors"))?),
            false => None,
        };
        Ok(Checkpoint { run, config, shared, tasks, optimizer, state })
    }
}

/// Syncs every file under `dir` to disk.
fn sync_files(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        if path.is_dir() {
            sync_files(&path)?;
            sync_dir(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HostTensor;

    fn checkpoint(step: u64) -> Checkpoint {
        let mut shared = Weights::new();
        shared.insert("pooler.dense.bias".into(), HostTensor::new(&[2], vec![1.0, step as f32]));
        let mut rte = Weights::new();
        rte.insert("tasks.RTE.head.bias".into(), HostTensor::new(&[2], vec![0.5, -0.5]));
        Checkpoint {
            run: serde_json::json!({"method": "pals"}),
            config: BertConfig::tiny(1, 8, 2),
            shared,
            tasks: BTreeMap::from([("RTE".to_string(), rte)]),
            optimizer: Some(Weights::new()),
            state: TrainerState { step, ..Default::default() },
        }
    }

    #[test]
    fn save_load_round_trip_and_replace() {
        let root = std::env::temp_dir().join(format!("pals-ckpt-{}", std::process::id()));
        let dir = root.join("last");
        checkpoint(3).save(&dir, &root).unwrap();
        checkpoint(7).save(&dir, &root).unwrap();
        let loaded = Checkpoint::load(&dir, true).unwrap();
        assert_eq!(loaded.state.step, 7);
        assert_eq!(loaded.shared["pooler.dense.bias"].data, vec![1.0, 7.0]);
        assert_eq!(loaded.tasks["RTE"]["tasks.RTE.head.bias"].data, vec![0.5, -0.5]);
        assert!(!sibling(&dir, "partial").exists() && !sibling(&dir, "old").exists());
        assert!(dir.join(COMPLETE).exists());
        assert_eq!(crate::train::rundir::checkpoint_to_read(&root).unwrap(), dir);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_directory_without_weights_is_a_clear_error() {
        let error = Checkpoint::load(Path::new("/nonexistent/pals"), false).err().unwrap().to_string();
        assert!(error.contains("not a pals checkpoint"), "{error}");
    }
}
