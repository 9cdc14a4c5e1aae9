//! The optimizer over named parameter tensors: gradient norms, clipping and one fused
//! Adam kernel per tensor, all recorded into the step's submit (no readback).
//!
//! Only the tensors passed to `step` are touched: in multi-task training the parameters
//! of tasks not sampled keep their values AND their moments (the original code's momentum
//! leak is a bug). Each tensor counts its own Adam steps, so its bias correction matches
//! the number of updates it has had.

use std::collections::BTreeMap;

use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::kernels::optimizer::{self, AdamConfig, ClipMode, NORM_PARTIALS};
use crate::model::{HostTensor, Weights};

/// Hyper-parameters of the optimizer (the learning rate comes per step from the schedule).
#[derive(Clone, Copy, Debug)]
pub struct OptimizerSettings {
    pub adam: AdamConfig,
    pub weight_decay: f32,
    pub clip: ClipMode,
    pub max_norm: f32,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        OptimizerSettings {
            adam: AdamConfig::adamw(),
            weight_decay: 0.01,
            clip: ClipMode::Global,
            max_norm: 1.0,
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
    steps: u32,
}

pub struct Optimizer {
    pub settings: OptimizerSettings,
    moments: BTreeMap<String, Moments>,
    norms: Tensor,
    coef: Tensor,
    partials: Tensor,
}

impl Optimizer {
    /// Zero moments for every (name, length).
    pub fn new(
        gpu: &Gpu,
        params: &[(String, usize)],
        settings: OptimizerSettings,
    ) -> Result<Optimizer, GpuError> {
        let mut moments = BTreeMap::new();
        for (name, len) in params {
            let m = gpu.zeros(&format!("{name}.m"), &[*len])?;
            let v = gpu.zeros(&format!("{name}.v"), &[*len])?;
            moments.insert(name.clone(), Moments { m, v, steps: 0 });
        }
        let count = params.len().max(1);
        Ok(Optimizer {
            settings,
            moments,
            norms: gpu.zeros("grad norms", &[count])?,
            coef: gpu.zeros("clip coefficients", &[count + 1])?,
            partials: gpu.zeros("norm partials", &[NORM_PARTIALS])?,
        })
    }

    /// Records the update of the given (name, parameter, gradient) tensors: their norms,
    /// the clip factors over them, and one Adam kernel each.
    pub fn step(
        &mut self,
        rec: &mut Recorder,
        params: &[(&str, &Tensor, &Tensor)],
        lr: f32,
    ) -> Result<(), GpuError> {
        let count = params.len();
        if count > self.norms.len() {
            let detail = format!("{count} tensors for an optimizer of {}", self.norms.len());
            return Err(GpuError::Shape { op: "Optimizer::step".into(), detail });
        }
        let norms = self.norms.view(&[count]);
        let coef = self.coef.view(&[count + 1]);
        for (slot, (_, _, grad)) in params.iter().enumerate() {
            optimizer::sum_squares(rec, grad, &self.partials, &norms, slot as u32)?;
        }
        optimizer::clip_coefficients(rec, &norms, &coef, self.settings.max_norm, self.settings.clip)?;
        for (slot, (name, param, grad)) in params.iter().enumerate() {
            let Some(state) = self.moments.get_mut(*name) else {
                let detail = format!("no optimizer state for '{name}'");
                return Err(GpuError::Shape { op: "Optimizer::step".into(), detail });
            };
            state.steps += 1;
            let decay = if decays(name) { self.settings.weight_decay } else { 0.0 };
            let s = &self.settings;
            optimizer::adam_step(
                rec,
                param,
                grad,
                &state.m,
                &state.v,
                &coef,
                slot as u32,
                lr,
                decay,
                state.steps,
                &s.adam,
            )?;
        }
        Ok(())
    }

    /// m and v of every tensor ("<name>.m", "<name>.v") and each tensor's step count.
    pub fn download(&self, gpu: &Gpu) -> Result<(Weights, BTreeMap<String, u32>), GpuError> {
        let mut state = Weights::new();
        let mut steps = BTreeMap::new();
        for (name, moments) in &self.moments {
            for (suffix, tensor) in [("m", &moments.m), ("v", &moments.v)] {
                let data = gpu.read::<f32>(tensor)?;
                state.insert(format!("{name}.{suffix}"), HostTensor::new(&tensor.shape, data));
            }
            steps.insert(name.clone(), moments.steps);
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
        for (name, moments) in &mut self.moments {
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
            moments.steps = steps.get(name).copied().unwrap_or(0);
        }
        Ok(())
    }
}
