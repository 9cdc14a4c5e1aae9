//! Gradient norms, clip coefficients and Adam on the CPU: f32 storage, f64 arithmetic.

use crate::contract::{AdamConfig, ClipMode};

/// Σ x².
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum()
}

/// Clip factors [T + 1] from squared norms [T]; the last entry is the global norm.
pub fn clip_coefficients(norms: &[f64], max_norm: f64, mode: ClipMode) -> Vec<f64> {
    let global = norms.iter().sum::<f64>().sqrt();
    let factor = |norm: f64| (max_norm / (norm + 1e-6)).min(1.0);
    let mut coef: Vec<f64> = norms
        .iter()
        .map(|&squared| match mode {
            ClipMode::None => 1.0,
            ClipMode::Global => factor(global),
            ClipMode::PerTensor => factor(squared.sqrt()),
        })
        .collect();
    coef.push(global);
    coef
}

/// One Adam step in place, the gradient scaled by `coef`; `step` counts from 1.
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    coef: f64,
    lr: f32,
    weight_decay: f32,
    step: u32,
    cfg: &AdamConfig,
) {
    let (beta1, beta2) = (cfg.beta1 as f64, cfg.beta2 as f64);
    let (bc1, bc2) = if cfg.bias_correction {
        let t = step as i32;
        (1.0 - beta1.powi(t), 1.0 - beta2.powi(t))
    } else {
        (1.0, 1.0)
    };
    for i in 0..param.len() {
        let g = grad[i] as f64 * coef;
        let m_new = beta1 * m[i] as f64 + (1.0 - beta1) * g;
        let v_new = beta2 * v[i] as f64 + (1.0 - beta2) * g * g;
        let update = (m_new / bc1) / ((v_new / bc2).sqrt() + cfg.eps as f64);
        let p = param[i] as f64;
        param[i] = (p - lr as f64 * (update + weight_decay as f64 * p)) as f32;
        m[i] = m_new as f32;
        v[i] = v_new as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-12, "got {got} want {want}");
    }

    #[test]
    fn clip_coefficients_by_hand() {
        // Tensor norms 3 and 4: global norm 5.
        let norms = [9.0, 16.0];
        let global = clip_coefficients(&norms, 1.0, ClipMode::Global);
        close(global[0], 1.0 / (5.0 + 1e-6));
        close(global[1], 1.0 / (5.0 + 1e-6));
        close(global[2], 5.0);
        assert_eq!(clip_coefficients(&norms, 10.0, ClipMode::Global)[..2], [1.0, 1.0]);
        let per_tensor = clip_coefficients(&norms, 3.5, ClipMode::PerTensor);
        close(per_tensor[0], 1.0); // 3 < 3.5: untouched
        close(per_tensor[1], 3.5 / (4.0 + 1e-6));
        assert_eq!(clip_coefficients(&norms, 0.1, ClipMode::None), [1.0, 1.0, 5.0]);
        assert_eq!(clip_coefficients(&[0.0], 1.0, ClipMode::Global), [1.0, 0.0]);
    }

    #[test]
    fn one_adam_step_by_hand() {
        // beta1 = 1/2, beta2 = 15/16, eps = 0, lr = 1/4, wd = 1/2, grad 8 clipped by 1/2 → g = 4.
        // m = 2, v = 16/16 = 1.
        let cfg = |bias_correction| AdamConfig { beta1: 0.5, beta2: 0.9375, eps: 0.0, bias_correction };
        let run = |bias_correction| {
            let (mut p, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
            adam_step(&mut p, &[8.0], &mut m, &mut v, 0.5, 0.25, 0.5, 1, &cfg(bias_correction));
            assert_eq!((m[0], v[0]), (2.0, 1.0));
            p[0]
        };
        // AdamW: m̂ = 2 / (1/2) = 4, v̂ = 1 / (1/16) = 16, update = 4 / 4 = 1;
        // param = 1 - 1/4 (1 + 1/2 · 1) = 0.625.
        assert_eq!(run(true), 0.625);
        // BERTAdam: update = 2 / √1 = 2; param = 1 - 1/4 (2 + 1/2) = 0.375.
        assert_eq!(run(false), 0.375);
    }

    #[test]
    fn eps_is_added_to_sqrt_v() {
        // g = 1 at step 1 without bias correction: m = 0.1, v = 0.001, update = 0.1 / (√0.001 + eps).
        let cfg = AdamConfig { beta1: 0.9, beta2: 0.999, eps: 0.01, bias_correction: false };
        let (mut p, mut m, mut v) = ([0.0f32], [0.0f32], [0.0f32]);
        adam_step(&mut p, &[1.0], &mut m, &mut v, 1.0, 1.0, 0.0, 1, &cfg);
        let b1 = 0.9f32 as f64;
        let b2 = 0.999f32 as f64;
        let want = -(1.0 - b1) / ((1.0 - b2).sqrt() + 0.01f32 as f64);
        assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
    }
}
