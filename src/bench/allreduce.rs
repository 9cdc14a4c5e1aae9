//! `pals bench --allreduce` (under mpirun): the gradient reduction of data-parallel
//! training at the real gradient sizes of a step (encoder + pooler + one PALs task) of
//! MiniLM and BERT-base, in f32 (what training sends) and in f16 (sent as f16, summed in
//! f32 in rank order: what mixed-precision gradients would cost). Beside them, as the
//! yardstick measured in the same run, MPI's own f32 all-reduce (whose summation order is
//! the library's choice, so training never uses it) on the same buffer.

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

/// One line per model and precision: bytes, time of the rank-order sum and of MPI's f32
/// all-reduce, the bus bandwidth 2·(N−1)/N·bytes/time (what a ring would move per rank),
/// and the time as a ratio of MPI's.
pub fn allreduce_report(comm: &dyn Comm, reps: usize) -> Vec<String> {
    let n = comm.size();
    let mut lines = vec![format!(
        "all-reduce over {n} ranks, {reps} reps: rank-order sum, f32 (training) and f16 sent / f32 summed, \
         vs MPI's own f32 all-reduce (yardstick)"
    )];
    for (name, config) in [("minilm", BertConfig::minilm()), ("base", BertConfig::base())] {
        let floats = gradient_floats(&config);
        // Each timing its own buffer: the sums grow it N-fold a call, and f16 overflows soonest.
        let fresh = || vec![1e-3f32; floats];
        let (mut a, mut b, mut c) = (fresh(), fresh(), fresh());
        let native = seconds(comm, reps, || comm.native_sum(&mut a));
        let f32_sum = seconds(comm, reps, || comm.sum(&mut b));
        let f16_sum = seconds(comm, reps, || comm.sum_f16(&mut c));
        let bus = |bytes: f64, t: f64| 2.0 * (n as f64 - 1.0) / n as f64 * bytes / t / 1e9;
        let line = |precision: &str, bytes: f64, t: f64| {
            format!(
                "{name:<7} {precision} {:>6.1} MB  rank-order {:>8.1} ms ({:>5.2} GB/s bus)  {:.2}× MPI's f32",
                bytes / 1e6,
                1e3 * t,
                bus(bytes, t),
                t / native
            )
        };
        let bytes = 4.0 * floats as f64;
        lines.push(format!(
            "{name:<7} MPI f32 all-reduce {:>8.1} ms ({:>5.2} GB/s bus)",
            1e3 * native,
            bus(bytes, native)
        ));
        lines.push(line("f32", bytes, f32_sum));
        lines.push(line("f16", bytes / 2.0, f16_sum));
    }
    lines
}
