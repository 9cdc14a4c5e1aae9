//! The optimizer over named parameter tensors: gradient norms, clipping and one fused
//! Adam kernel per tensor, all recorded into the step's submit (no readback).
//!
//! Only the tensors passed to `step` are touched: in multi-task training the parameters
//! of tasks not sampled keep their values AND their moments (the original code's momentum
//! leak is a bug). Each tensor counts its own Adam steps, so its bias correction matches
//! the number of updates it has had. The counts live on the GPU: with loss scaling a step
//! whose gradients overflowed is skipped there, and does not count (as in PyTorch).

use std::collections::{BTreeMap, HashMap};

use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::kernels::optimizer::{
    self, AdamConfig, AdamSteps, ClipMode, LossScaling, NORM_PARTIALS, bias_correction_table,
};
use crate::model::{HostTensor, Weights};

/// Hyper-parameters of the optimizer (the learning rate comes per step from the schedule).
#[derive(Clone, Copy, Debug)]
pub struct OptimizerSettings {
    pub adam: AdamConfig,
    pub weight_decay: f32,
    pub clip: ClipMode,
    pub max_norm: f32,
    /// Dynamic loss scaling (mixed precision); None keeps the scale at 1 and never skips.
    pub scaling: Option<LossScaling>,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        OptimizerSettings {
            adam: AdamConfig::adamw(),
            weight_decay: 0.01,
            clip: ClipMode::Global,
            max_norm: 1.0,
            scaling: None,
        }
    }
}

/// No weight decay on biases and LayerNorm parameters (BERT's rule).
pub fn decays(name: &str) -> bool {
    !(name.ends_with("bias") || name.contains("LayerNorm") || name.contains("layer_norm"))
}

struct Moments {
    m: Tensor,
    v: Tensor,
    /// Entry in `counts`.
    index: u32,
}

/// Where a step leaves what the host reads back with the loss: the scale the step used at
/// `slot`, whether it was skipped (1) at `slot + stride`.
pub struct ScaleRecord<'a> {
    pub record: &'a Tensor,
    pub slot: u32,
    pub stride: u32,
}

pub struct Optimizer {
    pub settings: OptimizerSettings,
    moments: BTreeMap<String, Moments>,
    norms: Tensor,
    /// [T + 2]: clip factors, the global norm, the found-inf flag.
    coef: Tensor,
    partials: Tensor,
    /// u32 [tensors]: Adam steps each tensor has had.
    counts: Tensor,
    /// Bias corrections by step (see `bias_correction_table`) and their pairs.
    corrections: Tensor,
    pairs: u32,
    /// [scale, growth counter]: the loss scale the next backward multiplies by.
    scaler: Tensor,
    /// The `counts` entries of each distinct list of tensors a step has updated.
    ids: HashMap<Vec<u32>, Tensor>,
    /// f16 copies the Adam kernel rewrites with each update (mixed precision), by name.
    half_copies: BTreeMap<String, Tensor>,
}

impl Optimizer {
    /// Zero moments for every (name, length).
    pub fn new(
        gpu: &Gpu,
        params: &[(String, usize)],
        settings: OptimizerSettings,
    ) -> Result<Optimizer, GpuError> {
        let mut moments = BTreeMap::new();
        for (index, (name, len)) in params.iter().enumerate() {
            let m = gpu.zeros(&format!("{name}.m"), &[*len])?;
            let v = gpu.zeros(&format!("{name}.v"), &[*len])?;
            moments.insert(name.clone(), Moments { m, v, index: index as u32 });
        }
        let count = params.len().max(1);
        let table = bias_correction_table(&settings.adam)?;
        let pairs = (table.len() / 2) as u32;
        let corrections = match table.is_empty() {
            true => gpu.zeros("bias corrections", &[1])?,
            false => gpu.upload("bias corrections", &[table.len()], &table)?,
        };
        let scale = settings.scaling.map_or(1.0, |s| s.init_scale);
        Ok(Optimizer {
            settings,
            moments,
            norms: gpu.zeros("grad norms", &[count])?,
            coef: gpu.zeros("clip coefficients", &[count + 2])?,
            partials: gpu.zeros("norm partials", &[NORM_PARTIALS])?,
            counts: gpu.zeros("adam steps", &[count])?,
            corrections,
            pairs,
            scaler: gpu.upload("loss scaler", &[2], &[scale, 0.0])?,
            ids: HashMap::new(),
            half_copies: BTreeMap::new(),
        })
    }

    /// Has each update of the tensor `name` also write `copy` (its f16 copy).
    pub fn keep_half_copy(&mut self, name: &str, copy: Tensor) -> Result<(), GpuError> {
        self.state(name)?;
        self.half_copies.insert(name.to_string(), copy);
        Ok(())
    }

    /// [1]: the loss scale the loss backward multiplies its gradient by (1 without scaling).
    pub fn loss_scale(&self) -> Tensor {
        self.scaler.view(&[1])
    }

    /// The loss scale and its growth counter (reads the GPU: for checkpoints).
    pub fn download_scaler(&self, gpu: &Gpu) -> Result<(f32, u32), GpuError> {
        let state = gpu.read::<f32>(&self.scaler)?;
        Ok((state[0], state[1] as u32))
    }

    /// Restores what `download_scaler` returned.
    pub fn restore_scaler(&self, gpu: &Gpu, scale: f32, growth: u32) -> Result<(), GpuError> {
        gpu.write(&self.scaler, &[scale, growth as f32])
    }

    fn state(&self, name: &str) -> Result<&Moments, GpuError> {
        self.moments.get(name).ok_or_else(|| GpuError::Shape {
            op: "Optimizer::step".into(),
            detail: format!("no optimizer state for '{name}'"),
        })
    }

    /// The uploaded `counts` entries of a step's tensors (made on first use).
    fn ids(&mut self, gpu: &Gpu, names: &[&str]) -> Result<Tensor, GpuError> {
        let ids = names.iter().map(|n| Ok(self.state(n)?.index)).collect::<Result<Vec<u32>, GpuError>>()?;
        if let Some(tensor) = self.ids.get(&ids) {
            return Ok(tensor.clone());
        }
        let tensor = gpu.upload("step tensor ids", &[ids.len()], &ids)?;
        self.ids.insert(ids, tensor.clone());
        Ok(tensor)
    }

    /// Records the update of the given (name, parameter, gradient) tensors: their norms,
    /// the clip factors over them, one Adam kernel each, and the end of the step (step
    /// counts, loss scale, and the scale and skip flag into `record`).
    pub fn step(
        &mut self,
        rec: &mut Recorder,
        params: &[(&str, &Tensor, &Tensor)],
        lr: f32,
        record: &ScaleRecord,
    ) -> Result<(), GpuError> {
        let count = params.len();
        if count > self.norms.len() {
            let detail = format!("{count} tensors for an optimizer of {}", self.norms.len());
            return Err(GpuError::Shape { op: "Optimizer::step".into(), detail });
        }
        let names: Vec<&str> = params.iter().map(|&(name, ..)| name).collect();
        let ids = self.ids(rec.gpu, &names)?;
        let norms = self.norms.view(&[count]);
        let coef = self.coef.view(&[count + 2]);
        for (slot, (_, _, grad)) in params.iter().enumerate() {
            optimizer::sum_squares(rec, grad, &self.partials, &norms, slot as u32)?;
        }
        let s = &self.settings;
        let scaling = s.scaling.is_some();
        optimizer::clip_coefficients(rec, &norms, &coef, &self.scaler, s.max_norm, s.clip, scaling)?;
        for (slot, (name, param, grad)) in params.iter().enumerate() {
            let state = self.state(name)?;
            let decay = if decays(name) { s.weight_decay } else { 0.0 };
            let steps = AdamSteps {
                counts: &self.counts,
                index: state.index,
                corrections: &self.corrections,
                pairs: self.pairs,
            };
            let (m, v, half) = (&state.m, &state.v, self.half_copies.get(*name));
            optimizer::adam_step(
                rec,
                param,
                grad,
                m,
                v,
                &coef,
                slot as u32,
                lr,
                decay,
                &steps,
                &s.adam,
                half,
            )?;
        }
        let ScaleRecord { record, slot, stride } = *record;
        optimizer::update_scaler(
            rec,
            &coef,
            &ids,
            &self.counts,
            &self.scaler,
            record,
            slot,
            stride,
            s.scaling,
        )
    }

    /// m and v of every tensor ("<name>.m", "<name>.v") and each tensor's step count.
    pub fn download(&self, gpu: &Gpu) -> Result<(Weights, BTreeMap<String, u32>), GpuError> {
        let mut state = Weights::new();
        let mut steps = BTreeMap::new();
        let counts = gpu.read::<u32>(&self.counts)?;
        for (name, moments) in &self.moments {
            for (suffix, tensor) in [("m", &moments.m), ("v", &moments.v)] {
                let data = gpu.read::<f32>(tensor)?;
                state.insert(format!("{name}.{suffix}"), HostTensor::new(&tensor.shape, data));
            }
            steps.insert(name.clone(), counts[moments.index as usize]);
        }
        Ok((state, steps))
    }

    /// Restores what `download` saved; an error names any tensor that is missing or
    /// has the wrong size.
    pub fn restore(
        &mut self,
        gpu: &Gpu,
        state: &Weights,
        steps: &BTreeMap<String, u32>,
    ) -> Result<(), GpuError> {
        let mut counts = vec![0u32; self.counts.len()];
        for (name, moments) in &self.moments {
            for (suffix, tensor) in [("m", &moments.m), ("v", &moments.v)] {
                let key = format!("{name}.{suffix}");
                let Some(saved) = state.get(&key) else {
                    return Err(GpuError::Shape {
                        op: "restoring optimizer".into(),
                        detail: format!("'{key}' missing"),
                    });
                };
                gpu.write(tensor, &saved.data)?;
            }
            counts[moments.index as usize] = steps.get(name).copied().unwrap_or(0);
        }
        gpu.write(&self.counts, &counts)
    }
}
