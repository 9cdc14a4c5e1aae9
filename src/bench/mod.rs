//! Kernel benchmarks shared by `pals bench` and `cargo bench`: GPU time and GFLOP/s at
//! BERT-base training shapes, with a CPU BLAS on the same shapes as the yardstick.

use std::time::Instant;

use crate::gpu::{Gpu, GpuError, Tensor};
use crate::kernels::attention::{self, AttentionShape};
use crate::kernels::elementwise::DropoutSpec;
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

/// Attention at BERT-base training size, with every buffer forward and backward need.
pub struct AttentionOperands {
    pub shape: AttentionShape,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    out: Tensor,
    lse: Tensor,
    d_out: Tensor,
    delta: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
}

const ATTENTION_DROPOUT: DropoutSpec = DropoutSpec { p: 0.1, seed: 1, stream: 2 };

impl AttentionOperands {
    /// Batch 32, 12 heads, sequence 128, head dim 64, with 10% padding.
    pub fn bert_base(gpu: &Gpu) -> Result<AttentionOperands, GpuError> {
        AttentionOperands::new(gpu, AttentionShape { batch: 32, seq: 128, heads: 12, head_dim: 64 })
    }

    pub fn new(gpu: &Gpu, shape: AttentionShape) -> Result<AttentionOperands, GpuError> {
        let n = shape.qkv_len();
        let mask: Vec<f32> = (0..shape.mask_len())
            .map(|i| if i % shape.seq >= shape.seq * 9 / 10 { -10000.0 } else { 0.0 })
            .collect();
        Ok(AttentionOperands {
            shape,
            q: gpu.upload("q", &[n], &random_vec(n, 3, 1.0))?,
            k: gpu.upload("k", &[n], &random_vec(n, 4, 1.0))?,
            v: gpu.upload("v", &[n], &random_vec(n, 5, 1.0))?,
            mask: gpu.upload("mask", &[shape.mask_len()], &mask)?,
            out: gpu.zeros("out", &[n])?,
            lse: gpu.zeros("lse", &[shape.rows_len()])?,
            d_out: gpu.upload("d_out", &[n], &random_vec(n, 6, 1.0))?,
            delta: gpu.zeros("delta", &[shape.rows_len()])?,
            dq: gpu.zeros("dq", &[n])?,
            dk: gpu.zeros("dk", &[n])?,
            dv: gpu.zeros("dv", &[n])?,
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.shape.head_dim as f32).sqrt()
    }

    /// Q·Kᵀ and P·V: 4·B·H·S²·D.
    pub fn forward_flops(&self) -> f64 {
        let s = &self.shape;
        4.0 * (s.batch * s.heads) as f64 * (s.seq * s.seq * s.head_dim) as f64
    }

    /// Recomputing Q·Kᵀ, then dV, dP, dQ, dK (dQ and dK/dV kernels each recompute P): 10·B·H·S²·D.
    pub fn backward_flops(&self) -> f64 {
        2.5 * self.forward_flops()
    }

    pub fn forward_seconds(&self, gpu: &Gpu) -> Result<f64, GpuError> {
        let started = Instant::now();
        let mut rec = gpu.recorder();
        let (o, s) = (self, self.scale());
        attention::attention_forward(
            &mut rec,
            o.shape,
            &o.q,
            &o.k,
            &o.v,
            &o.mask,
            &o.out,
            &o.lse,
            s,
            ATTENTION_DROPOUT,
        )?;
        rec.submit()?;
        gpu.wait()?;
        Ok(started.elapsed().as_secs_f64())
    }

    pub fn backward_seconds(&self, gpu: &Gpu) -> Result<f64, GpuError> {
        let started = Instant::now();
        let mut rec = gpu.recorder();
        let o = self;
        attention::attention_backward(
            &mut rec,
            o.shape,
            &o.q,
            &o.k,
            &o.v,
            &o.out,
            &o.d_out,
            &o.mask,
            &o.lse,
            &o.delta,
            &o.dq,
            &o.dk,
            &o.dv,
            o.scale(),
            ATTENTION_DROPOUT,
        )?;
        rec.submit()?;
        gpu.wait()?;
        Ok(started.elapsed().as_secs_f64())
    }
}

/// The attention rows of `pals bench`.
pub fn attention_report(gpu: &Gpu) -> Result<Vec<String>, GpuError> {
    let operands = AttentionOperands::bert_base(gpu)?;
    operands.forward_seconds(gpu)?;
    operands.backward_seconds(gpu)?; // compile outside the timing
    let forward = operands.forward_seconds(gpu)?;
    let backward = operands.backward_seconds(gpu)?;
    let row = |name: &str, seconds: f64, flops: f64| {
        format!("{name:<30} {:>10.2} {:>9.1}", seconds * 1e3, flops / seconds / 1e9)
    };
    Ok(vec![
        format!("{:<30} {:>10} {:>9}", "attention b32 h12 s128 d64", "GPU ms", "GFLOP/s"),
        row("forward", forward, operands.forward_flops()),
        row("backward", backward, operands.backward_flops()),
    ])
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
