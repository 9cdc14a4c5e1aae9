//! `pals bench --allreduce` (under mpirun): the gradient reduction of data-parallel
//! training at the real gradient sizes of a step (encoder + pooler + one PALs task) of
//! MiniLM and BERT-base, in f32. Beside it, as the yardstick measured in the same run,
//! MPI's own all-reduce (whose summation order is the library's choice, so training never
//! uses it) on the same buffer.

use std::time::Instant;

use crate::dist::Comm;
use crate::model::BertConfig;
use crate::model::tasks::{Method, MethodName, TaskSpec, task_param_count};

/// Floats one training step reduces: the shared encoder and pooler and one task's own.
pub fn gradient_floats(config: &BertConfig) -> usize {
    let method = Method::sized(MethodName::Pals, config);
    let (own, head) = task_param_count(config, &method, &TaskSpec::new("task", 2));
    crate::model::param_count(config) + own + head
}

/// Mean seconds of `reps` calls of `reduce` after one warm-up, the slowest rank's.
fn seconds(comm: &dyn Comm, reps: usize, mut reduce: impl FnMut()) -> f64 {
    reduce();
    let started = Instant::now();
    for _ in 0..reps {
        reduce();
    }
    let mut elapsed = [started.elapsed().as_secs_f32() / reps as f32];
    // The slowest rank's time bounds the step: max through gather_all, not a float sum.
    let all = comm.gather_all(&elapsed[0].to_le_bytes());
    elapsed[0] =
        all.iter().map(|b| f32::from_le_bytes(b[..4].try_into().unwrap_or([0; 4]))).fold(0.0, f32::max);
    elapsed[0] as f64
}

/// One line per model: bytes, time of the rank-order sum and of MPI's all-reduce, and the
/// bus bandwidth 2·(N−1)/N·bytes/time (what a ring would move per rank).
pub fn allreduce_report(comm: &dyn Comm, reps: usize) -> Vec<String> {
    let n = comm.size();
    let mut lines = vec![format!(
        "all-reduce over {n} ranks, f32, {reps} reps: rank-order sum (training) vs MPI's own all-reduce (yardstick)"
    )];
    for (name, config) in [("minilm", BertConfig::minilm()), ("base", BertConfig::base())] {
        let floats = gradient_floats(&config);
        let bytes = 4.0 * floats as f64;
        let mut values = vec![1e-3f32; floats];
        let ours = seconds(comm, reps, || comm.sum(&mut values));
        let native = seconds(comm, reps, || comm.native_sum(&mut values));
        let bus = |t: f64| 2.0 * (n as f64 - 1.0) / n as f64 * bytes / t / 1e9;
        lines.push(format!(
            "{name:<7} {:>6.1} MB  rank-order {:>8.1} ms ({:>5.2} GB/s bus)  MPI {:>8.1} ms ({:>5.2} GB/s bus)  ratio {:.2}×",
            bytes / 1e6,
            1e3 * ours,
            bus(ours),
            1e3 * native,
            bus(native),
            ours / native
        ));
    }
    lines
}
