//! The deterministic column sum on the GPU against the CPU reference.

mod common;

use common::{assert_close, gpu};
use pals::kernels::reduce;
use pals::reference::{self, random_vec};

/// (M, N): tiny, N not a multiple of 64, M past one chunk (2 passes) and past 256 chunks
/// (3 passes).
const SHAPES: &[(usize, usize)] = &[(1, 1), (7, 383), (300, 769), (1, 3072), (70_000, 5)];

/// Values in [-1, 1): an f32 sum of M of them is off by about M * 6e-8 at worst.
fn atol(m: usize) -> f32 {
    1e-6 * (m as f32).max(10.0)
}

fn run(x_host: &[f32], m: usize, n: usize, out_host: &[f32], accumulate: bool) -> Vec<f32> {
    let gpu = gpu();
    let x = gpu.upload("x", &[m, n], x_host).unwrap();
    let out = gpu.upload("out", &[n], out_host).unwrap();
    let mut rec = gpu.recorder();
    reduce::colsum(&mut rec, &x, &out, accumulate).unwrap();
    rec.submit().unwrap();
    gpu.read::<f32>(&out).unwrap()
}

#[test]
fn colsum_matches_reference() {
    for &(m, n) in SHAPES {
        let x = random_vec(m * n, 1, 1.0);
        let garbage = vec![f32::NAN; n]; // overwritten, never read
        let got = run(&x, m, n, &garbage, false);
        let want = reference::reduce::colsum(&x, n);
        assert_close(&format!("colsum {m}x{n}"), &got, &want, 1e-5, atol(m));
    }
}

#[test]
fn colsum_accumulates() {
    for &(m, n) in SHAPES {
        let x = random_vec(m * n, 2, 1.0);
        let before = random_vec(n, 3, 5.0);
        let got = run(&x, m, n, &before, true);
        let want: Vec<f32> =
            reference::reduce::colsum(&x, n).iter().zip(&before).map(|(s, b)| s + b).collect();
        assert_close(&format!("colsum += {m}x{n}"), &got, &want, 1e-5, atol(m));
    }
}

#[test]
fn colsum_is_bit_identical_twice() {
    let (m, n) = (1000, 129);
    let x = random_vec(m * n, 4, 1.0);
    let zeros = vec![0.0; n];
    let first = run(&x, m, n, &zeros, false);
    let second = run(&x, m, n, &zeros, false);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first), bits(&second));
}

#[test]
fn mismatched_shapes_are_errors() {
    let gpu = gpu();
    let x = gpu.zeros("x", &[4, 10]).unwrap();
    let out = gpu.zeros("out", &[11]).unwrap();
    let mut rec = gpu.recorder();
    let error = reduce::colsum(&mut rec, &x, &out, false).unwrap_err().to_string();
    assert!(error.contains("'x'") && error.contains("11"), "{error}");
}

/// GPU time of the bias-gradient shape; run on a real GPU with `--ignored --nocapture`.
#[test]
#[ignore]
fn colsum_timing() {
    let gpu = gpu();
    let (m, n) = (4096, 3072);
    let x = gpu.upload("x", &[m, n], &random_vec(m * n, 5, 1.0)).unwrap();
    let out = gpu.zeros("out", &[n]).unwrap();
    for _ in 0..3 {
        let mut rec = gpu.recorder();
        reduce::colsum(&mut rec, &x, &out, false).unwrap();
        for t in rec.submit_timed().unwrap() {
            eprintln!("colsum {m}x{n}: {} {:.1} us", t.label, t.nanos / 1e3);
        }
    }
}

/// Mixed precision sums f16 gradients (the FFN's d pre) into f32 bias gradients: the same
/// sums as the reference on the f16 values, in f32.
#[test]
fn colsum_reads_f16_storage() {
    let gpu = gpu();
    for &(m, n) in SHAPES {
        let x: Vec<f32> =
            random_vec(m * n, 5, 1.0).iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let x_gpu = gpu.upload_f16("x", &[m, n], &x).unwrap();
        let out = gpu.zeros("out", &[n]).unwrap();
        let mut rec = gpu.recorder();
        reduce::colsum(&mut rec, &x_gpu, &out, false).unwrap();
        rec.submit().unwrap();
        let want = reference::reduce::colsum(&x, n);
        assert_close(&format!("f16 colsum {m}x{n}"), &gpu.read::<f32>(&out).unwrap(), &want, 1e-5, atol(m));
    }
}
