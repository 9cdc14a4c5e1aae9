//! The learning-rate schedule of BERT fine-tuning: linear warmup, then linear decay to 0.
//!
//! `step` counts from 0. The first step already trains: step s < W (W warmup steps) uses
//! peak·(s+1)/W, so step W−1 reaches the peak. Steps s ≥ W use peak·(T−s)/(T−W), which is the
//! peak again at s = W and peak/(T−W) > 0 at the last step T−1: it would reach 0 at step T,
//! the first step not taken. (The original BERT code gives step 0 a rate of 0, wasting it.)

/// The paper's warmup: 10% of the steps.
pub const DEFAULT_WARMUP: f64 = 0.1;

/// Warmup steps W for `total_steps` T: round(fraction·T), within 0..=T.
pub fn warmup_steps(total_steps: u32, warmup_fraction: f64) -> u32 {
    let w = (warmup_fraction.clamp(0.0, 1.0) * f64::from(total_steps)).round();
    (w as u32).min(total_steps)
}

/// The learning rate of step `step` (from 0) of `total_steps`; 0 from step `total_steps` on.
pub fn lr(step: u32, total_steps: u32, warmup_fraction: f64, peak: f32) -> f32 {
    let (s, t) = (f64::from(step), f64::from(total_steps));
    let w = warmup_steps(total_steps, warmup_fraction);
    let factor = if step >= total_steps {
        0.0
    } else if step < w {
        (s + 1.0) / f64::from(w)
    } else {
        // Here w ≤ step < total, so total − w ≥ 1.
        (t - s) / (t - f64::from(w))
    };
    (f64::from(peak) * factor) as f32
}
