//! The ranks of an mpirun job through the `mpi` crate (Open MPI, MPICH). Reductions are a
//! gather to rank 0, a sum there in rank order and a broadcast: a fixed order, whatever
//! algorithm the MPI library would pick for an all-reduce.

use std::sync::Mutex;

use anyhow::{Result, bail};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Root};

/// Held until `finalize`, whose drop ends MPI.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

pub struct MpiComm {
    rank: usize,
    size: usize,
}

impl MpiComm {
    pub fn init() -> Result<MpiComm> {
        let Some(universe) = mpi::initialize() else { bail!("MPI was already started") };
        let world = universe.world();
        let comm = MpiComm { rank: world.rank() as usize, size: world.size() as usize };
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(universe);
        Ok(comm)
    }
}

pub fn finalize() {
    drop(UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take());
}

fn world() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

impl super::Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn sum(&self, values: &mut [f32]) {
        let world = world();
        let root = world.process_at_rank(0);
        if self.rank == 0 {
            let n = values.len();
            let mut all = vec![0f32; n * self.size];
            root.gather_into_root(&values[..], &mut all[..]);
            // ((rank 0 + rank 1) + rank 2) + …
            for other in all.chunks_exact(n.max(1)).skip(1) {
                for (value, x) in values.iter_mut().zip(other) {
                    *value += x;
                }
            }
        } else {
            root.gather_into(&values[..]);
        }
        root.broadcast_into(values);
    }

    fn sum_f16(&self, values: &mut [f32]) {
        let world = world();
        let root = world.process_at_rank(0);
        let mut halves: Vec<u16> = values.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        if self.rank == 0 {
            let n = values.len();
            let mut all = vec![0u16; n * self.size];
            root.gather_into_root(&halves[..], &mut all[..]);
            // ((rank 0 + rank 1) + rank 2) + … in f32, rounded to f16 once.
            let mut sums = vec![0f32; n];
            for rank in all.chunks_exact(n.max(1)) {
                for (sum, &h) in sums.iter_mut().zip(rank) {
                    *sum += half::f16::from_bits(h).to_f32();
                }
            }
            for (h, s) in halves.iter_mut().zip(&sums) {
                *h = half::f16::from_f32(*s).to_bits();
            }
        } else {
            root.gather_into(&halves[..]);
        }
        root.broadcast_into(&mut halves[..]);
        for (value, &h) in values.iter_mut().zip(&halves) {
            *value = half::f16::from_bits(h).to_f32();
        }
    }

    fn native_sum(&self, values: &mut [f32]) {
        let mut sum = vec![0f32; values.len()];
        world().all_reduce_into(&values[..], &mut sum[..], SystemOperation::sum());
        values.copy_from_slice(&sum);
    }

    fn gather_all(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let world = world();
        let mut lengths = vec![0u64; self.size];
        world.all_gather_into(&(bytes.len() as u64), &mut lengths[..]);
        let longest = lengths.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = bytes.to_vec();
        padded.resize(longest, 0);
        let mut all = vec![0u8; longest * self.size];
        world.all_gather_into(&padded[..], &mut all[..]);
        lengths
            .iter()
            .enumerate()
            .map(|(r, &len)| all[r * longest..r * longest + len as usize].to_vec())
            .collect()
    }

    fn abort(&self, code: i32) -> ! {
        world().abort(code)
    }
}
