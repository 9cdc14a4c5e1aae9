//! The contract the GPU model and the CPU reference share, and nothing else: the counter
//! RNG, where dropout draws from (sites and streams), attention's shape and the optimizer's
//! settings. Both `model`/`kernels` and `reference` import it; it imports neither, so the
//! reference stays an independent oracle and the GPU code never reaches into it.

pub mod dropout;
pub mod rng;

pub use dropout::{
    DropoutKey, DropoutSpec, SITE_EMBEDDINGS, SITE_HEAD, Site, dropout_stream, site, top_dropout_sites,
};

/// q, k, v, o and their gradients are [batch, seq, heads, head_dim]; the mask is
/// [batch, seq]; lse and delta are [batch, heads, seq].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Elements of q, k, v, o and their gradients.
    pub fn qkv_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }

    /// Elements of lse and delta.
    pub fn rows_len(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    pub fn mask_len(&self) -> usize {
        self.batch * self.seq
    }

    /// The softmax scale 1/√head_dim, rounded once to f32.
    pub fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }
}

/// How gradients are clipped before the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipMode {
    /// No clipping: every factor is 1.
    None,
    /// Scale all tensors by min(1, max_norm / global norm), the global norm being over all of them.
    Global,
    /// Scale each tensor by min(1, max_norm / its own norm), as in the PALs paper's code.
    PerTensor,
}

/// Adam hyper-parameters other than the learning rate and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// AdamW divides m and v by 1 − β^t; BERTAdam (the paper's) does not.
    pub bias_correction: bool,
}

impl AdamConfig {
    /// AdamW with bias correction, β = (0.9, 0.999), ε = 1e-6 (as BERT fine-tuning uses).
    pub fn adamw() -> AdamConfig {
        AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-6, bias_correction: true }
    }

    /// The original BERT optimizer: no bias correction, ε added to √v.
    pub fn bert_adam() -> AdamConfig {
        AdamConfig { bias_correction: false, ..AdamConfig::adamw() }
    }

    /// (1 − β1^t, 1 − β2^t) in f64 rounded to f32, or (1, 1) without bias correction.
    pub fn bias_corrections(&self, step: u32) -> (f32, f32) {
        if !self.bias_correction {
            return (1.0, 1.0);
        }
        let t = step as f64;
        let correction = |beta: f32| (1.0 - (beta as f64).powf(t)) as f32;
        (correction(self.beta1), correction(self.beta2))
    }
}

impl Default for AdamConfig {
    fn default() -> AdamConfig {
        AdamConfig::adamw()
    }
}

/// A deterministic pseudo-random vector in [-scale, scale) for initialisation, tests and
/// benchmarks.
pub fn random_vec(len: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let u = rng::rng_u32(seed, 0x5eed, i) as f64 / 4294967296.0;
            ((2.0 * u - 1.0) * scale as f64) as f32
        })
        .collect()
}
