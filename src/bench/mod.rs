//! Benchmarks shared by `pals bench` and `cargo bench`: kernels (GPU time and GFLOP/s at
//! BERT-base training shapes, with a CPU BLAS on the same shapes as the yardstick) and
//! whole warm training steps of a real-sized model (`train_bench`).

pub mod allreduce;
pub mod serve;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::contract::random_vec;
use crate::contract::rng::rng_u32;
use crate::data::cache::{TokenizedExample, TokenizedSplit};
use crate::data::custom::{CustomTask, Kind};
use crate::data::glue::{Label, Split};
use crate::data::source::TaskSource;
use crate::gpu::{ElementType, Gpu, GpuError, Tensor, Timing};
use crate::kernels::attention::{self, AttentionPath, AttentionShape};
use crate::kernels::matmul::{self, Epilogue, Kernel, Matmul};
use crate::model::BertConfig;
use crate::model::tasks::{Method, MethodName, TaskSpec};
use crate::train::trainer::{Precision, TaskData, TrainSettings, Trainer};

/// One benchmarked product.
pub struct MatmulCase {
    pub name: &'static str,
    pub op: Matmul,
}

/// MiniLM (hidden 384, FFN 1536, fused QKV 1152) at batch 8 × 128 tokens (M = 1024): every
/// encoder product of a training step, forward, dX = dY·W and dW = dYᵀ·X.
pub fn minilm_cases() -> Vec<MatmulCase> {
    let m = 1024;
    let case = |name, op| MatmulCase { name, op };
    vec![
        case("fwd 1024x1152x384 (QKV)", Matmul::new(m, 1152, 384).trans_b()),
        case("fwd 1024x384x384 (out)", Matmul::new(m, 384, 384).trans_b()),
        case("fwd 1024x1536x384 (FFN up)", Matmul::new(m, 1536, 384).trans_b()),
        case("fwd 1024x384x1536 (FFN down)", Matmul::new(m, 384, 1536).trans_b()),
        case("dX 1024x384x1152 (QKV)", Matmul::new(m, 384, 1152)),
        case("dX 1024x384x384 (out)", Matmul::new(m, 384, 384)),
        case("dX 1024x384x1536 (FFN up)", Matmul::new(m, 384, 1536)),
        case("dX 1024x1536x384 (FFN down)", Matmul::new(m, 1536, 384)),
        case("dW 1152x384x1024 (QKV)", Matmul::new(1152, 384, m).trans_a()),
        case("dW 384x384x1024 (out)", Matmul::new(384, 384, m).trans_a()),
        case("dW 1536x384x1024 (FFN up)", Matmul::new(1536, 384, m).trans_a()),
        case("dW 384x1536x1024 (FFN down)", Matmul::new(384, 1536, m).trans_a()),
    ]
}

/// BERT-base at batch 32 × 128 tokens (M = 4096): the forward products of a layer and
/// their backward forms (dX = dY·W, dW = dYᵀ·X).
pub fn bert_base_cases() -> Vec<MatmulCase> {
    let m = 4096;
    let case = |name, op| MatmulCase { name, op };
    vec![
        case("fwd 4096x768x768 (QKV/out)", Matmul::new(m, 768, 768).trans_b()),
        case("fwd 4096x3072x768 (FFN up)", Matmul::new(m, 3072, 768).trans_b()),
        case("fwd 4096x768x3072 (FFN down)", Matmul::new(m, 768, 3072).trans_b()),
        case("dX 4096x768x3072 (FFN up)", Matmul::new(m, 768, 3072)),
        case("dX 4096x3072x768 (FFN down)", Matmul::new(m, 3072, 768)),
        case("dW 768x3072x4096 (FFN up)", Matmul::new(3072, 768, m).trans_a()),
        case("dW 3072x768x4096 (FFN down)", Matmul::new(768, 3072, m).trans_a()),
    ]
}

pub struct MatmulOperands {
    pub a: Tensor,
    pub b: Tensor,
    pub c: Tensor,
}

impl MatmulOperands {
    pub fn new(gpu: &Gpu, op: &Matmul) -> Result<MatmulOperands, GpuError> {
        let (m, n, k) = (op.m, op.n, op.k);
        Ok(MatmulOperands {
            a: gpu.upload("bench A", &[m * k], &random_vec(m * k, 1, 1.0))?,
            b: gpu.upload("bench B", &[k * n], &random_vec(k * n, 2, 1.0))?,
            c: gpu.zeros("bench C", &[m, n])?,
        })
    }

    /// Seconds for `reps` products recorded into one submit, per product.
    pub fn gpu_seconds(&self, gpu: &Gpu, op: &Matmul, reps: usize) -> Result<f64, GpuError> {
        let started = Instant::now();
        let mut rec = gpu.recorder();
        for _ in 0..reps {
            matmul::matmul(&mut rec, &self.a, &self.b, &self.c, op, Epilogue::None)?;
        }
        rec.submit()?;
        gpu.wait()?;
        Ok(started.elapsed().as_secs_f64() / reps as f64)
    }
}

/// Seconds for one product by the CPU BLAS (matrixmultiply, all cores it uses).
pub fn cpu_seconds(op: &Matmul) -> f64 {
    let (m, n, k) = (op.m, op.n, op.k);
    let a = random_vec(m * k, 1, 1.0);
    let b = random_vec(k * n, 2, 1.0);
    let mut c = vec![0.0f32; m * n];
    // Row/column strides express the transposes without copying.
    let (rsa, csa) = if op.trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if op.trans_b { (1, k as isize) } else { (n as isize, 1) };
    let started = Instant::now();
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    started.elapsed().as_secs_f64()
}

/// The matmul table of `pals bench`: one row per case, MiniLM's shapes then BERT-base's.
pub fn matmul_report(gpu: &Gpu, reps: usize) -> Result<Vec<String>, GpuError> {
    let mut rows =
        vec![format!("{:<30} {:>10} {:>9} {:>10} {:>9}", "matmul", "GPU ms", "GFLOP/s", "CPU ms", "GFLOP/s")];
    for case in minilm_cases().into_iter().chain(bert_base_cases()) {
        let operands = MatmulOperands::new(gpu, &case.op)?;
        operands.gpu_seconds(gpu, &case.op, 1)?; // tune and warm up
        let gpu_time = operands.gpu_seconds(gpu, &case.op, reps)?;
        let cpu_time = cpu_seconds(&case.op);
        let flops = case.op.flops();
        rows.push(format!(
            "{:<30} {:>10.2} {:>9.1} {:>10.2} {:>9.1}",
            case.name,
            gpu_time * 1e3,
            flops / gpu_time / 1e9,
            cpu_time * 1e3,
            flops / cpu_time / 1e9
        ));
    }
    rows.push(bounds_check_cost(gpu, reps)?);
    Ok(rows)
}

/// What naga's runtime bounds checks would cost the matmul, which checks its own indices
/// and is built without them (`KernelSpec::trusted`): one product of BERT-base's, built
/// both ways in this run (the checked build is one more pipeline compile).
pub fn bounds_check_cost(gpu: &Gpu, reps: usize) -> Result<String, GpuError> {
    let case = &bert_base_cases()[0];
    let operands = MatmulOperands::new(gpu, &case.op)?;
    let mut seconds = [0.0; 2];
    let was = gpu.shader_checks();
    for (checks, slot) in [(true, 0), (false, 1)] {
        gpu.set_shader_checks(checks);
        let timed =
            operands.gpu_seconds(gpu, &case.op, 1).and_then(|_| operands.gpu_seconds(gpu, &case.op, reps));
        gpu.set_shader_checks(was);
        seconds[slot] = timed?;
    }
    Ok(format!(
        "bounds checks, {}: with naga's {:.2} ms, without (trusted, the default) {:.2} ms: {:.2}x",
        case.name,
        seconds[0] * 1e3,
        seconds[1] * 1e3,
        seconds[0] / seconds[1]
    ))
}

pub use crate::kernels::attention::AttentionOperands;

impl AttentionOperands {
    /// Batch 32, 12 heads, sequence 128, head dim 64, with 10% padding.
    pub fn bert_base(gpu: &Gpu) -> Result<AttentionOperands, GpuError> {
        AttentionOperands::filled(gpu, AttentionShape { batch: 32, seq: 128, heads: 12, head_dim: 64 })
    }

    /// MiniLM's training step: batch 8, 12 heads, sequence 128, head dim 32.
    pub fn minilm(gpu: &Gpu) -> Result<AttentionOperands, GpuError> {
        AttentionOperands::filled(gpu, AttentionShape { batch: 8, seq: 128, heads: 12, head_dim: 32 })
    }

    /// f32 operands holding random q, k, v and dO, the last tenth of each sequence masked.
    fn filled(gpu: &Gpu, shape: AttentionShape) -> Result<AttentionOperands, GpuError> {
        let o = AttentionOperands::new(gpu, shape, ElementType::F32)?;
        let n = shape.qkv_len();
        let mask: Vec<f32> = (0..shape.mask_len())
            .map(|i| if i % shape.seq >= shape.seq * 9 / 10 { -10000.0 } else { 0.0 })
            .collect();
        gpu.write(&o.mask, &mask)?;
        for (tensor, seed) in [(&o.q, 3), (&o.k, 4), (&o.v, 5), (&o.d_out, 6)] {
            gpu.write(tensor, &random_vec(n, seed, 1.0))?;
        }
        Ok(o)
    }
}

/// The attention rows of `pals bench`: MiniLM's step shape, then BERT-base's, on the path
/// this adapter runs, then on the other one as the yardstick, and their ratio.
pub fn attention_report(gpu: &Gpu) -> Result<Vec<String>, GpuError> {
    let mut rows = Vec::new();
    for operands in [AttentionOperands::minilm(gpu)?, AttentionOperands::bert_base(gpu)?] {
        let s = operands.shape;
        let chosen = attention::path(gpu, s, ElementType::F32)?;
        let other = match chosen {
            AttentionPath::Fused => AttentionPath::Unfused,
            AttentionPath::Unfused => AttentionPath::Fused,
        };
        let title = format!("attention b{} h{} s{} d{}", s.batch, s.heads, s.seq, s.head_dim);
        rows.push(format!("{title:<30} {:>10} {:>9}", "GPU ms", "GFLOP/s"));
        let mut seconds = Vec::new();
        for (path, role) in [(chosen, "this adapter's"), (other, "yardstick")] {
            operands.forward_seconds(gpu, path)?;
            operands.backward_seconds(gpu, path)?; // compile outside the timing
            let forward = operands.forward_seconds(gpu, path)?;
            let backward = operands.backward_seconds(gpu, path)?;
            let row = |name: &str, seconds: f64, flops: f64| {
                format!("{name:<30} {:>10.2} {:>9.1}", seconds * 1e3, flops / seconds / 1e9)
            };
            let name = path.name();
            rows.push(row(&format!("forward {name} ({role})"), forward, operands.forward_flops()));
            rows.push(row(&format!("backward {name} ({role})"), backward, operands.backward_flops()));
            seconds.push((forward, backward));
        }
        let ((forward, backward), (forward_other, backward_other)) = (seconds[0], seconds[1]);
        rows.push(format!(
            "{} over {}: forward {:.1}x, backward {:.1}x faster",
            chosen.name(),
            other.name(),
            forward_other / forward,
            backward_other / backward
        ));
    }
    Ok(rows)
}

/// GFLOP/s of every kernel this adapter runs on one shape, for `pals bench --tiles`.
pub fn tile_report(gpu: &Gpu, op: &Matmul, reps: usize) -> Result<Vec<String>, GpuError> {
    let operands = MatmulOperands::new(gpu, op)?;
    let mut rows = Vec::new();
    let coop = matmul::coop_unavailable(gpu).is_none().then_some(Kernel::Coop);
    for kernel in matmul::f32_kernels(gpu).into_iter().chain(coop) {
        let run = |reps: usize| -> Result<f64, GpuError> {
            let started = Instant::now();
            let mut rec = gpu.recorder();
            for _ in 0..reps {
                let (a, b, c) = (&operands.a, &operands.b, &operands.c);
                matmul::matmul_with(&mut rec, a, b, c, op, Epilogue::None, kernel)?;
            }
            rec.submit()?;
            gpu.wait()?;
            Ok(started.elapsed().as_secs_f64() / reps as f64)
        };
        let compile = run(1)?;
        let seconds = run(reps)?;
        rows.push(format!(
            "{}: {:.1} GFLOP/s ({:.1} ms; first call {:.1} ms)",
            kernel.name(),
            op.flops() / seconds / 1e9,
            seconds * 1e3,
            compile * 1e3
        ));
    }
    Ok(rows)
}

/// What `pals bench --train` runs: a model of `config` with random weights, one synthetic
/// two-class task whose every example has exactly `seq` tokens, `batch` sequences a step.
#[derive(Clone, Debug)]
pub struct TrainBench {
    pub config: BertConfig,
    pub method: MethodName,
    pub batch: usize,
    pub seq: usize,
    /// Timed steps after the warm-up.
    pub steps: usize,
    pub precision: Precision,
}

/// Steps before timing: the first compiles pipelines, tunes matmul tiles and allocates the
/// step's buffers; the second shows whether anything is still allocated after that.
pub const WARMUP_STEPS: usize = 2;

/// The step time, throughput, runtime counters and GPU time per kernel family.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub adapter: String,
    /// Which attention path the step ran (`kernels::attention::path`); on the unfused path
    /// its products on the batched matmul count as attention in `families`.
    pub attention_path: &'static str,
    pub bench: TrainBench,
    /// The method with its sizes, e.g. `Pals { dim: 102, heads: 6 }`.
    pub method: String,
    /// The sequence length that reached the GPU (the trainer pads to a multiple of 8).
    pub padded_seq: usize,
    /// Mean wall time of one timed step (train_step + wait).
    pub step_seconds: f64,
    /// Mean host time of one timed step before its wait: batch upload, recording the
    /// dispatches, encoding and submitting.
    pub host_seconds: f64,
    /// The encoding-and-submitting part of `host_seconds`.
    pub encoding_seconds: f64,
    pub dispatches_per_step: usize,
    pub submits_per_step: f64,
    /// Buffers created during each warm-up step.
    pub warmup_buffers: Vec<u64>,
    /// Buffers created during all timed steps together (the target is 0).
    pub timed_buffers: u64,
    /// Buffers created by the timestamped step (its query readback).
    pub timestamped_buffers: u64,
    /// Bind groups created during each warm-up step, and during all timed steps together
    /// (the target is 0: the recorder caches them).
    pub warmup_bind_groups: Vec<u64>,
    pub timed_bind_groups: u64,
    /// Bytes of every buffer created since the device opened (freed ones included).
    pub bytes_created: u64,
    /// Wall time of the first warm-up step (train_step + wait): where a first run pays
    /// for pipeline compiles (drivers like llvmpipe compile at first dispatch) and tuning.
    pub first_step_seconds: f64,
    /// Pipelines compiled since the device opened (all in the first warm-up step, unless
    /// a later step needs a new variant).
    pub pipelines: usize,
    /// Seconds spent tuning matmul tiles in this process (inside the first warm-up step).
    pub tuning_seconds: f64,
    /// GPU nanoseconds per kernel family of the timestamped step, in `FAMILIES` order;
    /// empty where the adapter has no timestamps inside passes.
    pub families: Vec<(&'static str, f64)>,
    /// GPU nanoseconds and dispatches per kernel label, slowest first (empty likewise).
    pub kernels: Vec<(&'static str, f64, usize)>,
    pub memory: Vec<String>,
}

/// Kernel families of the GPU time breakdown, in report order.
pub const FAMILIES: [&str; 9] =
    ["matmul", "attention", "layernorm", "elementwise", "embedding", "loss", "optimizer", "reduce", "other"];

/// The family of a kernel, by its `KernelSpec` name. Zeroing gradients (zero_fill) counts
/// as elementwise.
pub fn kernel_family(label: &str) -> &'static str {
    match label {
        l if l.starts_with("matmul") => "matmul",
        l if l.starts_with("attention") => "attention",
        l if l.starts_with("layernorm") => "layernorm",
        l if l.starts_with("gelu") || l.starts_with("tanh") => "elementwise",
        "dropout" | "add" | "add_assign" | "zero_fill" => "elementwise",
        "embedding_forward" | "segment_sum" => "embedding",
        "cross_entropy_loss" | "cross_entropy_backward" | "mse" => "loss",
        l if l.starts_with("sum_squares") => "optimizer",
        "clip_coefficients" | "adam_step" => "optimizer",
        "colsum" => "reduce",
        _ => "other",
    }
}

/// The share of matmul in GPU time the kernels aim for at BERT-base training size.
pub const MATMUL_TARGET: f64 = 0.65;

/// GPU nanoseconds per family, every family listed (zeros included).
pub fn family_times(timings: &[Timing]) -> Vec<(&'static str, f64)> {
    let mut times: Vec<(&'static str, f64)> = FAMILIES.iter().map(|&f| (f, 0.0)).collect();
    for t in timings {
        let family = kernel_family(t.label);
        let slot = times.iter_mut().find(|(f, _)| *f == family).expect("every family is listed");
        slot.1 += t.nanos;
    }
    times
}

/// GPU nanoseconds and dispatch count per label, slowest first.
pub fn kernel_times(timings: &[Timing]) -> Vec<(&'static str, f64, usize)> {
    let mut by_label: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
    for t in timings {
        let entry = by_label.entry(t.label).or_default();
        entry.0 += t.nanos;
        entry.1 += 1;
    }
    let mut kernels: Vec<_> = by_label.into_iter().map(|(label, (nanos, n))| (label, nanos, n)).collect();
    kernels.sort_by(|a, b| b.1.total_cmp(&a.1));
    kernels
}

/// One synthetic two-class task: `count` examples of exactly `seq` tokens each, BERT's
/// [CLS] id (101, wrapped into small vocabularies) then random ids, the second half as
/// segment B. The timings do not depend on the values.
fn synthetic_task(c: &BertConfig, seq: usize, count: usize) -> TaskData {
    let vocab = c.vocab_size.max(1) as u32;
    let examples = (0..count)
        .map(|index| {
            let ids = (0..seq)
                .map(|j| if j == 0 { 101 % vocab } else { rng_u32(7, index as u32, j as u32) % vocab })
                .collect();
            let second = if c.type_vocab_size > 1 { 1 } else { 0 };
            let type_ids = (0..seq).map(|j| if j < seq / 2 { 0 } else { second }).collect();
            let label = Some(Label::Class(index as u32 % 2));
            TokenizedExample { ids, type_ids, label, index }
        })
        .collect();
    let train =
        TokenizedSplit { task: "bench".into(), split: Split::Train, examples, skipped: 0, cached: false };
    let labels = vec!["0".to_string(), "1".to_string()];
    let task =
        CustomTask { name: "bench".into(), dir: Default::default(), kind: Kind::Classification, labels };
    TaskData::new(TaskSource::Custom(task), train, Vec::new())
}

/// A trainer built for benchmarking: random weights, the synthetic task, no output.
pub struct TrainSession<'g> {
    gpu: &'g Gpu,
    pub trainer: Trainer<'g>,
    pub method: Method,
    /// The sequence length that reaches the GPU (the trainer pads to a multiple of 8).
    pub padded_seq: usize,
}

impl<'g> TrainSession<'g> {
    pub fn new(gpu: &'g Gpu, bench: &TrainBench) -> anyhow::Result<TrainSession<'g>> {
        let c = &bench.config;
        if bench.batch == 0 || bench.seq == 0 {
            anyhow::bail!("--batch and --seq must be positive");
        }
        let padded_seq = bench.seq.next_multiple_of(8);
        if padded_seq > c.max_position_embeddings {
            anyhow::bail!(
                "--seq {} (padded to {padded_seq}) exceeds the model's {} positions",
                bench.seq,
                c.max_position_embeddings
            );
        }
        let settings = TrainSettings {
            tasks: vec!["bench".into()],
            method: bench.method,
            batch_size: bench.batch,
            max_length: bench.seq,
            epochs: 1,
            // Long enough that no benchmark runs past the schedule (the timings would not
            // change: past it the learning rate is 0, the work the same).
            steps_per_epoch: 1 << 20,
            precision: bench.precision,
            ..TrainSettings::default()
        };
        let method = settings.method(c)?;
        let data = synthetic_task(c, bench.seq, 2 * bench.batch);
        let shared = crate::model::random_weights(c, settings.seed);
        // Nothing is saved: the paths are never written.
        let nowhere = std::env::temp_dir();
        let trainer = Trainer::new(
            gpu,
            settings,
            c.clone(),
            &shared,
            &BTreeMap::new(),
            vec![data],
            &nowhere,
            &nowhere,
        )?;
        Ok(TrainSession { gpu, trainer, method, padded_seq })
    }

    /// One training step, waited for; returns the host time before the wait (batch
    /// upload, recording, encoding and the submit).
    pub fn step(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.trainer.train_step()?;
        let host = started.elapsed();
        self.gpu.wait()?;
        Ok(host)
    }
}

/// Builds the trainer, warms up, times `steps` steps and one timestamped step.
pub fn train_bench(gpu: &Gpu, bench: &TrainBench) -> anyhow::Result<TrainReport> {
    let c = &bench.config;
    if bench.steps == 0 {
        anyhow::bail!("--steps must be positive");
    }
    let mut session = TrainSession::new(gpu, bench)?;
    let padded_seq = session.padded_seq;
    let (mut warmup_buffers, mut warmup_bind_groups) = (Vec::new(), Vec::new());
    let mut first_step_seconds = None;
    for _ in 0..WARMUP_STEPS {
        let (buffers, bind_groups) = (gpu.buffers_created(), gpu.bind_groups_created());
        let started = Instant::now();
        session.step()?;
        first_step_seconds.get_or_insert(started.elapsed().as_secs_f64());
        warmup_buffers.push(gpu.buffers_created() - buffers);
        warmup_bind_groups.push(gpu.bind_groups_created() - bind_groups);
    }
    let (buffers, bind_groups, submits) = (gpu.buffers_created(), gpu.bind_groups_created(), gpu.submits());
    let encoding = gpu.encoding_seconds();
    let mut host = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..bench.steps {
        host += session.step()?;
    }
    let per_step = |seconds: f64| seconds / bench.steps as f64;
    let step_seconds = per_step(started.elapsed().as_secs_f64());
    let host_seconds = per_step(host.as_secs_f64());
    let encoding_seconds = per_step(gpu.encoding_seconds() - encoding);
    let timed_buffers = gpu.buffers_created() - buffers;
    let timed_bind_groups = gpu.bind_groups_created() - bind_groups;
    let submits_per_step = (gpu.submits() - submits) as f64 / bench.steps as f64;
    let dispatches_per_step = session.trainer.dispatches;
    let before = gpu.buffers_created();
    let timings = session.trainer.train_step_timed()?;
    let timestamped_buffers = gpu.buffers_created() - before;

    let tasks: Vec<TaskSpec> = session.trainer.data.iter().map(|t| t.spec.clone()).collect();
    let method = session.method;
    let mixed = bench.precision == Precision::Mixed;
    let heads = c.num_attention_heads;
    let attention_shape =
        AttentionShape { batch: bench.batch, seq: padded_seq, heads, head_dim: c.head_dim() };
    let qkv = if mixed { ElementType::F16 } else { ElementType::F32 };
    let mut memory = crate::model::memory::memory_report(c, bench.batch, padded_seq, mixed);
    memory.extend(crate::model::memory::task_memory_report(c, &method, &tasks, bench.batch, padded_seq));
    Ok(TrainReport {
        adapter: gpu.describe(),
        attention_path: attention::path(gpu, attention_shape, qkv)?.name(),
        bench: bench.clone(),
        method: format!("{method:?}"),
        padded_seq,
        step_seconds,
        host_seconds,
        encoding_seconds,
        dispatches_per_step,
        submits_per_step,
        warmup_buffers,
        timed_buffers,
        timestamped_buffers,
        warmup_bind_groups,
        timed_bind_groups,
        bytes_created: gpu.bytes_created(),
        tuning_seconds: gpu.tune.spent.lock().unwrap().as_secs_f64(),
        first_step_seconds: first_step_seconds.unwrap_or_default(),
        pipelines: gpu.pipeline_count(),
        families: if timings.is_empty() { Vec::new() } else { family_times(&timings) },
        kernels: kernel_times(&timings),
        memory,
    })
}

impl TrainReport {
    pub fn tokens_per_step(&self) -> usize {
        self.bench.batch * self.padded_seq
    }

    /// The matmul share of the timestamped step's GPU time, if there are timestamps.
    pub fn matmul_share(&self) -> Option<f64> {
        let total: f64 = self.families.iter().map(|f| f.1).sum();
        let matmul = self.families.iter().find(|f| f.0 == "matmul")?.1;
        (total > 0.0).then(|| matmul / total)
    }

    /// GPU seconds in the timestamped step's dispatches, if there are timestamps.
    pub fn gpu_seconds(&self) -> Option<f64> {
        let total: f64 = self.families.iter().map(|f| f.1).sum();
        (total > 0.0).then_some(total * 1e-9)
    }

    /// The printed report.
    pub fn lines(&self) -> Vec<String> {
        let (b, c) = (&self.bench, &self.bench.config);
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let padded = match self.padded_seq == b.seq {
            true => String::new(),
            false => format!(" (padded to {})", self.padded_seq),
        };
        let mut lines = vec![
            format!("adapter: {}", self.adapter),
            format!("attention: {} path", self.attention_path),
            format!(
                "config: {} layers x {} hidden, {} heads, intermediate {}, vocab {} ({} encoder parameters)",
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.vocab_size,
                crate::model::param_count(c)
            ),
            format!(
                "method: {} ({}), 1 synthetic task of 2 classes, precision {}",
                b.method, self.method, b.precision
            ),
            format!(
                "shape: batch {} x seq {}{padded}; {WARMUP_STEPS} warm-up steps, {} timed",
                b.batch, b.seq, b.steps
            ),
            format!(
                "step time: {:.1} ms (train_step + wait, mean of {}), {:.2} sequences/s, {:.0} tokens/s",
                self.step_seconds * 1e3,
                b.steps,
                b.batch as f64 / self.step_seconds,
                self.tokens_per_step() as f64 / self.step_seconds
            ),
            format!(
                "host time per step: {:.1} ms before the wait ({:.1} ms uploading and recording, {:.1} ms \
                 encoding and submitting); GPU time in dispatches: {}",
                self.host_seconds * 1e3,
                (self.host_seconds - self.encoding_seconds) * 1e3,
                self.encoding_seconds * 1e3,
                match self.gpu_seconds() {
                    Some(gpu) => format!("{:.1} ms (timestamped step)", gpu * 1e3),
                    None => "no timestamps inside passes on this adapter".into(),
                }
            ),
            format!(
                "dispatches per step: {}; submits per step: {:.2}",
                self.dispatches_per_step, self.submits_per_step
            ),
            format!(
                "GPU buffers created: warm-up steps {:?}, timed steps {} (target 0), timestamped step {} \
                 (its timestamp resolve and readback buffers, kept for the next); {:.1} MiB created \
                 since the device opened (freed tuning scratch included)",
                self.warmup_buffers,
                self.timed_buffers,
                self.timestamped_buffers,
                mib(self.bytes_created)
            ),
            format!(
                "bind groups created: warm-up steps {:?}, timed steps {} (target 0)",
                self.warmup_bind_groups, self.timed_bind_groups
            ),
            format!(
                "first warm-up step: {:.2} s, {} pipelines compiled in this run; matmul tile tuning {:.2} s \
                 of it (a driver's shader cache makes later runs cheaper)",
                self.first_step_seconds, self.pipelines, self.tuning_seconds
            ),
        ];
        let total: f64 = self.families.iter().map(|f| f.1).sum();
        if total <= 0.0 {
            lines.push("GPU time per kernel family: no timestamps inside passes on this adapter".into());
        } else {
            lines.push(format!(
                "GPU time per kernel family (timestamped step, {:.1} ms in dispatches):",
                total / 1e6
            ));
            for (family, nanos) in &self.families {
                lines.push(format!(
                    "  {family:<12} {:>6.1}% {:>10.2} ms",
                    100.0 * nanos / total,
                    nanos / 1e6
                ));
            }
            lines.push("slowest kernels (GPU time, dispatches):".into());
            for (label, nanos, count) in self.kernels.iter().take(8) {
                lines.push(format!(
                    "  {label:<28} {:>6.1}% {:>10.2} ms {count:>6}",
                    100.0 * nanos / total,
                    nanos / 1e6
                ));
            }
            let share = self.matmul_share().unwrap_or(0.0);
            let verdict = if share >= MATMUL_TARGET { "met" } else { "not met" };
            lines.push(format!(
                "matmul share {:.1}% against the {:.0}% target: {verdict}",
                100.0 * share,
                100.0 * MATMUL_TARGET
            ));
        }
        lines.extend(self.memory.iter().cloned());
        lines
    }
}
