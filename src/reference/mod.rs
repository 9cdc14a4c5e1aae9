//! The CPU reference: plain, obviously-correct Rust (f32 storage, f64 sums) for every
//! kernel forward and backward. Written independently of the GPU code so that a
//! cross-check means something; its own backward passes are checked by finite differences.

pub mod attention;
pub mod bert;
pub mod elementwise;
pub mod embedding;
pub mod layernorm;
pub mod loss;
pub mod matmul;
pub mod optimizer;
pub mod reduce;
pub mod tasks;

pub use crate::contract::{random_vec, rng};

/// Each value rounded to the nearest f16 (ties to even) and back: what an f16 buffer holds.
pub fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// Central finite difference of a scalar function of `x` at element `i`, in f64.
pub fn finite_difference(x: &[f64], i: usize, h: f64, f: &dyn Fn(&[f64]) -> f64) -> f64 {
    let mut plus = x.to_vec();
    let mut minus = x.to_vec();
    plus[i] += h;
    minus[i] -= h;
    (f(&plus) - f(&minus)) / (2.0 * h)
}
