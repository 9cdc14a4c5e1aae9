//! Multi-task training: which task trains at each step, and each task's endless stream of
//! batches.
//!
//! Each step trains one task's batch; task i is drawn with p_i ∝ N_i^α (N_i its training
//! set size): α = 1 proportional, 0.5 square root, annealed α = 1 − 0.8·e/(E − 1) over the
//! epochs e = 0..E−1 (an epoch is a fixed number of steps, not a pass over the data). Round
//! robin visits the tasks in turn (the original's version only ever trained CoLA). The task
//! of a step is a pure function of (seed, step), so a resumed run draws the same tasks.

use super::batch::{Batch, BatchOptions, bucketed_order, make_batch};
use super::cache::TokenizedSplit;
use super::glue::{DataError, Result};
use crate::contract::rng::rng_u32;

const STREAM_TASKS: u32 = 0x7a5c_0001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    Proportional,
    Sqrt,
    Annealed,
    RoundRobin,
}

impl Sampling {
    pub const ALL: [Sampling; 4] =
        [Sampling::Proportional, Sampling::Sqrt, Sampling::Annealed, Sampling::RoundRobin];

    pub fn name(self) -> &'static str {
        match self {
            Sampling::Proportional => "proportional",
            Sampling::Sqrt => "sqrt",
            Sampling::Annealed => "annealed",
            Sampling::RoundRobin => "round-robin",
        }
    }

    /// One of [`Sampling::name`]'s names, case-insensitive, `_` for `-` allowed.
    pub fn from_name(name: &str) -> Result<Sampling> {
        let key = name.to_lowercase().replace('_', "-");
        Sampling::ALL.into_iter().find(|s| s.name() == key).ok_or_else(|| DataError::UnknownName {
            what: "sampling",
            name: name.to_string(),
            known: Sampling::ALL.map(Sampling::name).join(", "),
        })
    }
}

#[derive(Clone, Debug)]
pub struct TaskSampler {
    sizes: Vec<usize>,
    sampling: Sampling,
    epochs: usize,
    steps_per_epoch: usize,
    seed: u32,
    /// Tasks with data, in order: round robin visits these.
    active: Vec<usize>,
}

impl TaskSampler {
    /// `sizes[i]` is task i's training set size; tasks of size 0 are never drawn. Errors
    /// unless some task has data and `epochs` and `steps_per_epoch` are positive.
    pub fn new(
        sizes: &[usize],
        sampling: Sampling,
        epochs: usize,
        steps_per_epoch: usize,
        seed: u32,
    ) -> Result<TaskSampler> {
        let active: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] > 0).collect();
        if active.is_empty() || epochs == 0 || steps_per_epoch == 0 {
            return Err(DataError::Invalid(format!(
                "task sampling needs a task with data and positive epochs and steps per epoch \
                 (sizes {sizes:?}, {epochs} epochs, {steps_per_epoch} steps per epoch)"
            )));
        }
        Ok(TaskSampler { sizes: sizes.to_vec(), sampling, epochs, steps_per_epoch, seed, active })
    }

    /// The epoch of `step`; steps past the last epoch count as the last.
    pub fn epoch(&self, step: u64) -> usize {
        ((step / self.steps_per_epoch as u64) as usize).min(self.epochs - 1)
    }

    /// The exponent α of epoch `epoch` (1 for round robin, where it is unused).
    pub fn alpha(&self, epoch: usize) -> f64 {
        match self.sampling {
            Sampling::Proportional | Sampling::RoundRobin => 1.0,
            Sampling::Sqrt => 0.5,
            Sampling::Annealed if self.epochs == 1 => 1.0,
            Sampling::Annealed => {
                let e = epoch.min(self.epochs - 1) as f64;
                1.0 - 0.8 * e / (self.epochs - 1) as f64
            }
        }
    }

    /// p_i of every task in epoch `epoch`; they sum to 1.
    pub fn probabilities(&self, epoch: usize) -> Vec<f64> {
        let weights: Vec<f64> = match self.sampling {
            Sampling::RoundRobin => self.sizes.iter().map(|&n| (n > 0) as u8 as f64).collect(),
            _ => self.sizes.iter().map(|&n| (n as f64).powf(self.alpha(epoch))).collect(),
        };
        let total: f64 = weights.iter().sum();
        weights.iter().map(|w| w / total).collect()
    }

    /// The task that trains at `step`.
    pub fn next(&self, step: u64) -> usize {
        if self.sampling == Sampling::RoundRobin {
            return self.active[(step % self.active.len() as u64) as usize];
        }
        let bits = rng_u32(self.seed, STREAM_TASKS ^ (step >> 32) as u32, step as u32);
        let u = (bits as f64 + 0.5) / 4294967296.0;
        let mut cumulative = 0.0;
        let probabilities = self.probabilities(self.epoch(step));
        for &i in &self.active {
            cumulative += probabilities[i];
            if u < cumulative {
                return i;
            }
        }
        // Rounding left the sum a hair under u.
        *self.active.last().unwrap()
    }
}

/// One task's training batches, without end: each pass over the data is a fresh
/// [`bucketed_order`] drawn with seed `seed ^ pass`. Give every task its own seed.
#[derive(Clone, Debug)]
pub struct EpochIterator {
    split: TokenizedSplit,
    options: BatchOptions,
    seed: u32,
    pass: u32,
    order: Vec<Vec<usize>>,
    position: usize,
}

impl EpochIterator {
    /// Errors on an empty split.
    pub fn new(split: TokenizedSplit, options: BatchOptions, seed: u32) -> Result<EpochIterator> {
        if split.examples.is_empty() {
            return Err(DataError::Invalid(format!(
                "{} {} has no examples to train on",
                split.task, split.split
            )));
        }
        let order = bucketed_order(&split.lengths(), options.batch_size, seed);
        Ok(EpochIterator { split, options, seed, pass: 0, order, position: 0 })
    }

    /// The pass (from 0) the latest batch came from.
    pub fn pass(&self) -> u32 {
        self.pass
    }

    pub fn split(&self) -> &TokenizedSplit {
        &self.split
    }

    /// The next batch, starting a reshuffled pass when the current one is used up.
    pub fn next_batch(&mut self) -> Batch {
        if self.position == self.order.len() {
            self.pass += 1;
            self.order =
                bucketed_order(&self.split.lengths(), self.options.batch_size, self.seed ^ self.pass);
            self.position = 0;
        }
        self.position += 1;
        make_batch(&self.split.examples, &self.order[self.position - 1], &self.options)
    }
}
