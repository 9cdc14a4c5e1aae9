//! Kernel benchmarks shared by `pals bench` and `cargo bench`: GPU time and GFLOP/s at
//! BERT-base training shapes, with a CPU BLAS on the same shapes as the yardstick.

use std::time::Instant;

use crate::gpu::{Gpu, GpuError, Tensor};
use crate::kernels::matmul::{self, Epilogue, Matmul};
use crate::reference::random_vec;

/// One benchmarked product.
pub struct MatmulCase {
    pub name: &'static str,
    pub op: Matmul,
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

/// The matmul table of `pals bench --kernels`: one row per case.
pub fn matmul_report(gpu: &Gpu, reps: usize) -> Result<Vec<String>, GpuError> {
    let mut rows =
        vec![format!("{:<30} {:>10} {:>9} {:>10} {:>9}", "matmul", "GPU ms", "GFLOP/s", "CPU ms", "GFLOP/s")];
    for case in bert_base_cases() {
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
    Ok(rows)
}

/// Placeholder until the attention kernels land: no rows.
pub fn attention_report(_gpu: &Gpu) -> Result<Vec<String>, GpuError> {
    Ok(Vec::new())
}

/// GFLOP/s of every usable tile on one shape, for `pals bench --tiles`.
pub fn tile_report(gpu: &Gpu, op: &Matmul, reps: usize) -> Result<Vec<String>, GpuError> {
    let operands = MatmulOperands::new(gpu, op)?;
    let mut rows = Vec::new();
    for tile in matmul::usable_tiles(gpu) {
        let run = |reps: usize| -> Result<f64, GpuError> {
            let started = Instant::now();
            let mut rec = gpu.recorder();
            for _ in 0..reps {
                matmul::matmul_with_tile(
                    &mut rec,
                    &operands.a,
                    &operands.b,
                    &operands.c,
                    op,
                    Epilogue::None,
                    tile,
                )?;
            }
            rec.submit()?;
            gpu.wait()?;
            Ok(started.elapsed().as_secs_f64() / reps as f64)
        };
        let compile = run(1)?;
        let seconds = run(reps)?;
        rows.push(format!(
            "{tile:?}: {:.1} GFLOP/s ({:.1} ms; first call {:.1} ms)",
            op.flops() / seconds / 1e9,
            seconds * 1e3,
            compile * 1e3
        ));
    }
    Ok(rows)
}
