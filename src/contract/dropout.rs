//! Where dropout draws from. A mask is a function of (seed, stream, element index): the
//! stream is `dropout_stream(step, site)`, the index the element's row-major position in
//! the global batch's tensor dropout applies to (attention probabilities:
//! ((b·heads + h)·S + i)·S + j), wrapping at 2^32. A rank of a data-parallel run holds
//! slice `shard` of N equal slices of the global batch, so its element i is the global
//! element shard·len + i: N ranks draw one process's masks.
//! Sites: [`SITE_EMBEDDINGS`], then per layer l [`site`]`(l, Site::…)`, task-specific
//! modules at `Site::TaskSpecific` (top-attn's blocks at virtual layers past the last),
//! and the head at [`SITE_HEAD`].

/// Which dropout masks a training step draws; `None` where a step runs without dropout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u32,
    pub step: u32,
    /// Which of the equal slices of the global batch this pass holds (the rank; 0 alone).
    pub shard: u32,
}

impl DropoutKey {
    /// The key of a whole batch (one process).
    pub const fn new(seed: u32, step: u32) -> DropoutKey {
        DropoutKey { seed, step, shard: 0 }
    }
}

/// Where a dropout sits in the network; with the layer it picks the RNG stream.
#[derive(Clone, Copy, Debug)]
pub enum Site {
    AttentionProbs = 0,
    AttentionOutput = 1,
    FfnOutput = 2,
    /// Reserved for task-specific modules (PAL attention probabilities).
    TaskSpecific = 3,
}

pub const SITE_EMBEDDINGS: u32 = 0;
/// The classifier head's dropout on the pooled output.
pub const SITE_HEAD: u32 = 255;

pub fn site(layer: usize, which: Site) -> u32 {
    1 + 4 * layer as u32 + which as u32
}

/// The dropout sites of top-attn block `block` after `layers` encoder layers: (attention
/// probabilities, block output), the task-specific sites of virtual layers L + 2·block
/// and L + 2·block + 1.
pub fn top_dropout_sites(layers: usize, block: usize) -> (u32, u32) {
    let layer = layers + 2 * block;
    (site(layer, Site::TaskSpecific), site(layer + 1, Site::TaskSpecific))
}

/// Every training step draws fresh masks: 256 sites per step.
pub fn dropout_stream(step: u32, site: u32) -> u32 {
    step.wrapping_mul(256).wrapping_add(site)
}

/// Where dropout draws from: the same (seed, stream) regenerates the same mask.
#[derive(Clone, Copy, Debug)]
pub struct DropoutSpec {
    pub p: f32,
    pub seed: u32,
    pub stream: u32,
    /// The key's shard: see the module header.
    pub shard: u32,
}

impl DropoutSpec {
    /// Dropout that keeps everything (attention takes a spec even when nothing drops).
    pub const NONE: DropoutSpec = DropoutSpec { p: 0.0, seed: 0, stream: 0, shard: 0 };

    /// Dropout at `site` with probability `p`, or None when the step has no key or p is 0.
    pub fn at(key: Option<DropoutKey>, p: f64, site: u32) -> Option<DropoutSpec> {
        let key = key?;
        (p > 0.0).then(|| DropoutSpec {
            p: p as f32,
            seed: key.seed,
            stream: dropout_stream(key.step, site),
            shard: key.shard,
        })
    }

    /// `at`, or [`DropoutSpec::NONE`].
    pub fn at_or_none(key: Option<DropoutKey>, p: f64, site: u32) -> DropoutSpec {
        DropoutSpec::at(key, p, site).unwrap_or(DropoutSpec::NONE)
    }

    /// The mask index of element 0 of this slice, `len` elements long: shard·len, wrapping
    /// like the index itself (0 for one process, whose bits it leaves unchanged).
    pub fn first_index(&self, len: usize) -> u32 {
        self.shard.wrapping_mul(len as u32)
    }

    /// Drop when the draw is below this: p * 2^32, saturating.
    pub fn threshold(&self) -> u32 {
        (self.p.clamp(0.0, 1.0) as f64 * 4294967296.0).min(u32::MAX as f64) as u32
    }

    pub fn scale(&self) -> f32 {
        if self.p >= 1.0 { 0.0 } else { 1.0 / (1.0 - self.p) }
    }
}
