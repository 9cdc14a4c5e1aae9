//! Data-parallel training: which rank this process is among how many, and the few
//! collectives the trainer needs. `pals train` without mpirun is one rank (`Single`), where
//! every collective is the identity; under mpirun, built with `--features mpi`, `mpi.rs`.
//!
//! Every rank samples the same task and builds the same global batch each step, trains its
//! slice of the rows, and the gradients are summed in rank order (rank 0 + rank 1 + …) on
//! rank 0 and broadcast, so the bits never depend on MPI's choice of algorithm and the
//! optimizer, which runs on every rank, keeps the parameters identical.

#[cfg(feature = "mpi")]
mod mpi;

use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::data::batch::{Batch, Labels};
use crate::data::cache::TokenizedSplit;
use crate::gpu::{Gpu, Readback, Recorder, Tensor};
use crate::model::EncoderBatch;

/// The ranks of one training run.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `values` summed over the ranks in rank order: the same bits on every rank.
    fn sum(&self, values: &mut [f32]);
    /// `sum` with the values sent as f16 both ways (half the bytes): rank 0 adds the ranks'
    /// f16 values in f32, in rank order, and rounds the sum to f16. What mixed-precision
    /// gradients would cost; `pals bench --allreduce` times it, training does not use it.
    fn sum_f16(&self, values: &mut [f32]);
    /// MPI's own all-reduce, summed in whatever order the library picks: the yardstick of
    /// `pals bench --allreduce`, never used in training.
    fn native_sum(&self, values: &mut [f32]);
    /// Every rank's `bytes` (of any length), in rank order, on every rank.
    fn gather_all(&self, bytes: &[u8]) -> Vec<Vec<u8>>;
    /// Stops every rank of the run with exit status `code`.
    fn abort(&self, code: i32) -> !;
}

/// The one process of a run without mpirun.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum(&self, _values: &mut [f32]) {}
    fn sum_f16(&self, values: &mut [f32]) {
        for value in values {
            *value = half::f16::from_f32(*value).to_f32();
        }
    }
    fn native_sum(&self, _values: &mut [f32]) {}
    fn gather_all(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        vec![bytes.to_vec()]
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

static WORLD: OnceLock<Box<dyn Comm>> = OnceLock::new();

/// This process's run: what `init` started, or `Single`.
pub fn world() -> &'static dyn Comm {
    match WORLD.get() {
        Some(comm) => comm.as_ref(),
        None => &Single,
    }
}

/// Ranks in the job when an MPI launcher (Open MPI, MPICH, PMIx) started this process.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|key| std::env::var(key).ok()?.parse().ok())
}

/// This rank's index among the ranks on its machine (0 without a launcher).
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"]
        .iter()
        .find_map(|key| std::env::var(key).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Starts MPI when mpirun launched more than one rank; call first, before anything can fail,
/// so that a failure on one rank can stop them all.
pub fn init() -> Result<&'static dyn Comm> {
    if launched_ranks().unwrap_or(1) > 1 && WORLD.get().is_none() {
        #[cfg(feature = "mpi")]
        {
            let _ = WORLD.set(Box::new(mpi::MpiComm::init()?));
        }
        #[cfg(not(feature = "mpi"))]
        bail!(
            "started by mpirun with {} ranks, but this pals was built without MPI: \
             build it with `cargo build --release --features mpi`",
            launched_ranks().unwrap_or(1)
        );
    }
    Ok(world())
}

/// Ends MPI cleanly (a rank that exits without it counts as failed); a no-op without MPI.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    mpi::finalize();
}

/// Reports `error` naming this rank, then stops every rank (exit status 1): no rank is left
/// waiting in a collective for one that failed.
pub fn fail(error: &anyhow::Error) -> ! {
    let comm = world();
    match comm.size() {
        1 => eprintln!("error: {error:#}"),
        n => eprintln!("error: rank {} of {n}: {error:#}", comm.rank()),
    }
    comm.abort(1)
}

/// The adapter a rank takes by default, as an index into `pals devices`: the local rank's
/// among the adapters of the best one's backend (round robin when the machine has fewer
/// than ranks); `None` for one process, which picks the best adapter. Only one backend
/// counts because a device is often listed again under another (lavapipe under Vulkan and
/// OpenGL, a GPU under Vulkan and GL): that copy is no second device, and a slow one.
pub fn default_adapter(backend: Option<&str>) -> Option<String> {
    if world().size() == 1 {
        return None;
    }
    let backends: Vec<wgpu::Backend> =
        crate::gpu::list_adapters(backend).ok()?.iter().map(|a| a.get_info().backend).collect();
    let indices = same_backend_as_first(&backends);
    indices.get(local_rank() % indices.len().max(1)).map(usize::to_string)
}

/// The indices of the entries with the first entry's backend.
fn same_backend_as_first(backends: &[wgpu::Backend]) -> Vec<usize> {
    let Some(&first) = backends.first() else { return Vec::new() };
    (0..backends.len()).filter(|&i| backends[i] == first).collect()
}

/// Whether `flag` is set on any rank: ranks stop together (Ctrl-C reaches them at
/// different steps).
pub fn any_rank(comm: &dyn Comm, flag: bool) -> bool {
    if comm.size() == 1 {
        return flag;
    }
    let mut count = [flag as u8 as f32];
    comm.sum(&mut count);
    count[0] > 0.0
}

/// Returns once every rank has called it.
pub fn wait_for_all(comm: &dyn Comm) {
    // One float, not none: Open MPI's gather of empty buffers crashed rank 1 (signal 11).
    comm.sum(&mut [0.0]);
}

/// Checks that `--batch-size` splits evenly over the ranks.
pub fn check_batch_size(comm: &dyn Comm, batch_size: usize) -> Result<()> {
    let n = comm.size();
    if !batch_size.is_multiple_of(n) {
        bail!("--batch-size {batch_size} is the global batch: it must be a multiple of the {n} ranks");
    }
    Ok(())
}

/// Checks that every rank was given the same run settings (`json`, a JSON object): a flag
/// given differently to one rank stops the run with an error naming that rank and field.
pub fn check_same_settings(comm: &dyn Comm, json: &serde_json::Value) -> Result<()> {
    let all = comm.gather_all(json.to_string().as_bytes());
    let parse = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap_or_default();
    let first = parse(&all[0]);
    for (rank, bytes) in all.iter().enumerate().skip(1) {
        let other = parse(bytes);
        if other == first {
            continue;
        }
        let mut differences = Vec::new();
        if let (Some(a), Some(b)) = (first.as_object(), other.as_object()) {
            for (key, value) in a {
                if b.get(key) != Some(value) {
                    let theirs = b.get(key).map_or("nothing".into(), |v| v.to_string());
                    differences.push(format!("--{} {theirs} (rank 0: {value})", key.replace('_', "-")));
                }
            }
        }
        bail!("rank {rank} was given other run settings than rank 0: {}", differences.join(", "));
    }
    Ok(())
}

/// Checks that `hash` (of this rank's parameters) is the same on every rank.
pub fn check_same_hash(comm: &dyn Comm, what: &str, hash: u64) -> Result<()> {
    let all = comm.gather_all(&hash.to_le_bytes());
    let hashes: Vec<u64> =
        all.iter().map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]))).collect();
    if hashes.iter().any(|&h| h != hashes[0]) {
        let listed: Vec<String> =
            hashes.iter().enumerate().map(|(r, h)| format!("rank {r} {h:016x}")).collect();
        bail!("{what} differ across ranks: {}", listed.join(", "));
    }
    Ok(())
}

/// FNV-1a over the bits of `values`, continuing from `hash` (start at `HASH_START`).
pub fn hash_bits(hash: u64, values: &[u32]) -> u64 {
    values.iter().fold(hash, |h, &v| (h ^ v as u64).wrapping_mul(0x100_0000_01b3))
}

pub const HASH_START: u64 = 0xcbf2_9ce4_8422_2325;

/// This rank's rows of a global batch, [rank·B/N, (rank+1)·B/N), and the share of the
/// batch's loss they carry: (real rows here) / (real rows in all). Each rank's loss is the
/// mean over its own real rows, so Σ share·loss is the global batch's mean.
pub fn shard(batch: Batch, comm: &dyn Comm) -> (Batch, f32) {
    let n = comm.size();
    if n == 1 {
        return (batch, 1.0);
    }
    let rows = batch.encoder.batch / n;
    let (first, s) = (comm.rank() * rows, batch.encoder.seq);
    let cut = |range: std::ops::Range<usize>| range.start * s..range.end * s;
    let tokens = cut(first..first + rows);
    let encoder = EncoderBatch {
        batch: rows,
        seq: s,
        ids: batch.encoder.ids[tokens.clone()].to_vec(),
        type_ids: batch.encoder.type_ids[tokens.clone()].to_vec(),
        mask: batch.encoder.mask[tokens].to_vec(),
    };
    let mine = first..first + rows;
    let labels = match &batch.labels {
        Labels::None => Labels::None,
        Labels::Class(v) => Labels::Class(v[mine.clone()].to_vec()),
        Labels::Score(v) => Labels::Score(v[mine.clone()].to_vec()),
    };
    let weights = batch.weights[mine.clone()].to_vec();
    let total: f32 = batch.weights.iter().sum();
    let share = weights.iter().sum::<f32>() / total.max(1.0);
    let real = batch.rows.len();
    let rows_here = batch.rows[mine.start.min(real)..mine.end.min(real)].to_vec();
    (Batch { encoder, labels, weights, rows: rows_here }, share)
}

/// Predictions of `split` in its order, each rank predicting its slice of the examples,
/// [rank·n/N, (rank+1)·n/N), and every rank receiving all of them, gathered in rank order.
pub fn predict_sharded(
    comm: &dyn Comm,
    split: &TokenizedSplit,
    predict: &mut dyn FnMut(&TokenizedSplit) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let (n, rank, count) = (comm.size(), comm.rank(), split.examples.len());
    if n == 1 {
        return predict(split);
    }
    let mine = TokenizedSplit {
        task: split.task.clone(),
        split: split.split,
        examples: split.examples[rank * count / n..(rank + 1) * count / n].to_vec(),
        skipped: split.skipped,
        cached: split.cached,
    };
    let predictions = predict(&mine)?;
    let bytes: Vec<u8> = predictions.iter().flat_map(|p| p.to_le_bytes()).collect();
    let all = comm.gather_all(&bytes);
    let gathered: Vec<f32> = all
        .iter()
        .flat_map(|b| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    if gathered.len() != count {
        bail!("sharded evaluation gathered {} predictions for {count} examples", gathered.len());
    }
    Ok(gathered)
}

/// A note when a run saved by `saved` ranks resumes on another number: allowed (every
/// rank holds the whole state, and dropout masks follow the global batch), but the sums
/// over ranks change order, so the run continues the same up to float rounding only.
pub fn resume_note(comm: &dyn Comm, saved: usize) -> Option<String> {
    let now = comm.size();
    (saved != 0 && saved != now).then(|| {
        format!(
            "note: resuming a run saved by {saved} rank(s) on {now}: it continues the same run up to \
             float summation order, not bit for bit (resume at {saved} ranks for that)"
        )
    })
}

/// Gradient buckets per step: enough that the reduction of the top layers' overlaps the
/// backward of the lower ones, few enough that each collective amortizes its latency.
const BUCKETS: usize = 8;

/// How much of the gradient reduction ran while the backward was still running.
#[derive(Clone, Copy, Debug, Default)]
pub struct Overlap {
    pub steps: u64,
    /// Seconds in the rank-order sums (the collectives), all buckets of all steps.
    pub reduce_seconds: f64,
    /// Of those, the seconds of buckets whose sum ended before the backward did.
    pub hidden_seconds: f64,
}

impl Overlap {
    pub fn hidden_fraction(&self) -> f64 {
        if self.reduce_seconds > 0.0 { self.hidden_seconds / self.reduce_seconds } else { 0.0 }
    }

    /// The log line of a run over several ranks; `None` for one process.
    pub fn report(&self) -> Option<String> {
        (self.steps > 0).then(|| {
            format!(
                "gradient all-reduce: {:.1} ms a step, {:.0}% of it hidden behind the backward ({} steps)",
                1e3 * self.reduce_seconds / self.steps as f64,
                100.0 * self.hidden_fraction(),
                self.steps
            )
        })
    }
}

/// Submits `rec` (a step's forward and backward) and replaces each gradient with Σ over
/// ranks (in rank order) of share·gradient: the global batch's gradient, the same bits on
/// every rank. The gradients come back in buckets, in the order the backward finishes them
/// (task head and top layers first): each bucket is summed while the GPU runs the layers
/// below and written back before the optimizer's submit. The sum is elementwise, so the
/// buckets do not change the bits.
pub fn submit_and_sum_gradients(
    gpu: &Gpu,
    comm: &dyn Comm,
    rec: Recorder,
    grads: &[&Tensor],
    share: f32,
    overlap: &mut Overlap,
) -> Result<()> {
    let order = rec.finish_order(grads);
    let total: usize = grads.iter().map(|g| g.len()).sum();
    let cap = total.div_ceil(BUCKETS);
    // Consecutive tensors in finishing order, about `cap` floats each.
    let mut buckets: Vec<Vec<&Tensor>> = vec![Vec::new()];
    let mut floats = 0;
    for &i in &order {
        if floats >= cap {
            buckets.push(Vec::new());
            floats = 0;
        }
        buckets.last_mut().expect("one bucket at least").push(grads[i]);
        floats += grads[i].len();
    }
    // A thread submits the parts (on lavapipe a submit runs its work before it returns)
    // and hands over each bucket's readback; this one sums the buckets in order meanwhile.
    let (send, receive) = std::sync::mpsc::channel::<Readback>();
    let all_submitted = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        let submitter = scope.spawn(|| {
            let result = rec.submit_parts_with(&buckets, &mut |_, readback| {
                let _ = send.send(readback);
            });
            all_submitted.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(send);
            result
        });
        let mut arrived = std::collections::VecDeque::new();
        let mut backward_done = false;
        for (k, bucket) in buckets.iter().enumerate() {
            if arrived.is_empty() {
                match receive.recv() {
                    Ok(readback) => arrived.push_back(readback),
                    Err(_) => break, // the submitter failed: its error is joined below
                }
            }
            let readback = arrived.pop_front().expect("received above");
            let mut flat = readback.wait(gpu)?;
            for g in &mut flat {
                *g *= share;
            }
            let started = Instant::now();
            comm.sum(&mut flat);
            let spent = started.elapsed().as_secs_f64();
            // Hidden while the backward still ran: parts left to submit, or the last
            // bucket's part not yet done on the GPU.
            arrived.extend(receive.try_iter());
            let last_in = arrived.len() == buckets.len() - k - 1;
            let submitted = all_submitted.load(std::sync::atomic::Ordering::SeqCst);
            backward_done = backward_done
                || k + 1 == buckets.len()
                || (submitted && last_in && arrived.back().is_some_and(|r: &Readback| r.is_ready(gpu)));
            overlap.reduce_seconds += spent;
            if !backward_done {
                overlap.hidden_seconds += spent;
            }
            let mut offset = 0;
            for grad in bucket {
                gpu.write(grad, &flat[offset..offset + grad.len()])?;
                offset += grad.len();
            }
        }
        submitter.join().map_err(|_| anyhow::anyhow!("the gradient submitter panicked"))??;
        Ok(())
    })?;
    overlap.steps += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranks_share_out_only_the_best_adapters_backend() {
        use wgpu::Backend::{Gl, Vulkan};
        assert_eq!(super::same_backend_as_first(&[Vulkan, Gl]), vec![0]);
        assert_eq!(super::same_backend_as_first(&[Vulkan, Vulkan, Gl, Vulkan]), vec![0, 1, 3]);
        assert_eq!(super::same_backend_as_first(&[Gl]), vec![0]);
        assert!(super::same_backend_as_first(&[]).is_empty());
    }

    use super::*;

    #[test]
    fn resuming_at_another_rank_count_is_noted() {
        assert!(resume_note(&Single, 1).is_none());
        assert!(resume_note(&Single, 0).is_none(), "checkpoints from before ranks were kept");
        let note = resume_note(&Single, 2).unwrap();
        assert!(note.contains("saved by 2 rank(s) on 1") && note.contains("not bit for bit"), "{note}");
    }
}
