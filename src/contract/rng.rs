//! The counter-based RNG of shaders/rng.wgsl, bit for bit.

pub fn pcg_hash(input: u32) -> u32 {
    let state = input.wrapping_mul(747796405).wrapping_add(2891336453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277803737);
    (word >> 22) ^ word
}

pub fn rng_u32(seed: u32, stream: u32, index: u32) -> u32 {
    pcg_hash(index ^ pcg_hash(stream ^ pcg_hash(seed)))
}

/// Whether dropout with drop probability `p` keeps element `index`.
pub fn keep(seed: u32, stream: u32, index: u32, p: f32) -> bool {
    let threshold = (p.clamp(0.0, 1.0) as f64 * 4294967296.0).min(u32::MAX as f64) as u32;
    rng_u32(seed, stream, index) >= threshold
}
