//! `cargo bench`: matmul at BERT-base training shapes and attention (batch 32, 12 heads,
//! seq 128, head dim 64), forward and backward, with a CPU BLAS on the same matmul shapes
//! as the yardstick. Criterion reports time; GFLOP/s follow from the throughput setting.
//! Then whole warm training steps of MiniLM (batch 8 × seq 64, modest for lavapipe);
//! throughput in tokens.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pals::bench::{
    AttentionOperands, MatmulOperands, TrainBench, TrainSession, WARMUP_STEPS, bert_base_cases, cpu_seconds,
};
use pals::gpu::Gpu;
use pals::kernels::attention;
use pals::model::BertConfig;
use pals::model::tasks::MethodName;
use pals::train::trainer::Precision;

fn gpu() -> Gpu {
    Gpu::from_env().unwrap_or_else(|error| panic!("benchmarks need a GPU adapter: {error}"))
}

fn matmul(c: &mut Criterion) {
    let gpu = gpu();
    eprintln!("adapter: {}", gpu.describe());
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10);
    for case in bert_base_cases() {
        let operands = MatmulOperands::new(&gpu, &case.op).unwrap();
        operands.gpu_seconds(&gpu, &case.op, 1).unwrap(); // tune and compile outside the timing
        group.throughput(Throughput::Elements(case.op.flops() as u64));
        group.bench_function(format!("gpu {}", case.name), |b| {
            b.iter(|| operands.gpu_seconds(&gpu, &case.op, 1).unwrap())
        });
        group.bench_function(format!("cpu {}", case.name), |b| b.iter(|| cpu_seconds(&case.op)));
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let gpu = gpu();
    let operands = AttentionOperands::bert_base(&gpu).unwrap();
    let path = attention::path(&gpu, operands.shape, pals::gpu::ElementType::F32).unwrap();
    operands.forward_seconds(&gpu, path).unwrap();
    operands.backward_seconds(&gpu, path).unwrap();
    let mut group = c.benchmark_group(format!("attention b32 h12 s128 d64 {}", path.name()));
    group.sample_size(10);
    group.throughput(Throughput::Elements(operands.forward_flops() as u64));
    group.bench_function("forward", |b| b.iter(|| operands.forward_seconds(&gpu, path).unwrap()));
    group.throughput(Throughput::Elements(operands.backward_flops() as u64));
    group.bench_function("backward", |b| b.iter(|| operands.backward_seconds(&gpu, path).unwrap()));
    group.finish();
}

fn training_step(c: &mut Criterion) {
    let gpu = gpu();
    let bench = TrainBench {
        config: BertConfig::minilm(),
        method: MethodName::Pals,
        batch: 8,
        seq: 64,
        steps: 1,
        precision: Precision::F32,
    };
    let mut session = TrainSession::new(&gpu, &bench).unwrap();
    for _ in 0..WARMUP_STEPS {
        session.step().unwrap(); // compile, tune and allocate outside the timing
    }
    let mut group = c.benchmark_group("training step minilm pals b8 s64");
    group.sample_size(10);
    group.throughput(Throughput::Elements((bench.batch * session.padded_seq) as u64));
    group.bench_function("train_step + wait", |b| b.iter(|| session.step().unwrap()));
    group.finish();
}

criterion_group!(benches, matmul, attention, training_step);
criterion_main!(benches);
