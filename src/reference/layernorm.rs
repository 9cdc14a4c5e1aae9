//! LayerNorm (HF BERT: biased variance, caller's eps) with an optional residual add, in f64,
//! and LayerNorm(Dropout(x) + residual), the fused kernel's contract.

use super::elementwise::dropout_f64;
use crate::contract::DropoutSpec;

fn apply(drop: DropoutSpec, v: &[f64]) -> Vec<f64> {
    dropout_f64(v, &drop)
}

/// s = x + residual, or x.
fn input(x: &[f32], residual: Option<&[f32]>) -> Vec<f64> {
    match residual {
        Some(r) => x.iter().zip(r).map(|(&a, &b)| a as f64 + b as f64).collect(),
        None => x.iter().map(|&a| a as f64).collect(),
    }
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

fn narrow(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

/// Mean and 1 / sqrt(biased variance + eps) of one row.
fn stats(row: &[f64], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, 1.0 / (variance + eps).sqrt())
}

/// y [M, N], mean [M], rstd [M] for s [M, N].
pub fn forward_f64(s: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = gamma.len();
    let (mut y, mut means, mut rstds) = (Vec::new(), Vec::new(), Vec::new());
    for row in s.chunks_exact(n) {
        let (mean, rstd) = stats(row, eps);
        for ((v, g), b) in row.iter().zip(gamma).zip(beta) {
            y.push((v - mean) * rstd * g + b);
        }
        means.push(mean);
        rstds.push(rstd);
    }
    (y, means, rstds)
}

/// ds [M, N], dgamma [N], dbeta [N] from dy, recomputing the stats of s.
pub fn backward_f64(s: &[f64], gamma: &[f64], dy: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = gamma.len();
    let mut ds = Vec::with_capacity(s.len());
    let mut dgamma = vec![0.0; n];
    let mut dbeta = vec![0.0; n];
    for (row, dy_row) in s.chunks_exact(n).zip(dy.chunks_exact(n)) {
        let (mean, rstd) = stats(row, eps);
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        let g: Vec<f64> = dy_row.iter().zip(gamma).map(|(d, w)| d * w).collect();
        let g_mean = g.iter().sum::<f64>() / n as f64;
        let gx_mean = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n as f64;
        for c in 0..n {
            ds.push(rstd * (g[c] - g_mean - xhat[c] * gx_mean));
            dgamma[c] += dy_row[c] * xhat[c];
            dbeta[c] += dy_row[c];
        }
    }
    (ds, dgamma, dbeta)
}

/// y = LayerNorm(x + residual) over rows of gamma.len(); returns (y, mean, rstd).
pub fn layernorm_forward(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = input(x, residual);
    let (y, mean, rstd) = forward_f64(&s, &widen(gamma), &widen(beta), eps as f64);
    (narrow(&y), narrow(&mean), narrow(&rstd))
}

/// (dx, dgamma, dbeta) for upstream gradient dy; dx is also the residual's gradient.
pub fn layernorm_backward(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    dy: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = input(x, residual);
    let (dx, dgamma, dbeta) = backward_f64(&s, &widen(gamma), &widen(dy), eps as f64);
    (narrow(&dx), narrow(&dgamma), narrow(&dbeta))
}

/// s = Dropout(x) + residual in f64.
fn dropped_input(x: &[f32], drop: DropoutSpec, residual: &[f32]) -> Vec<f64> {
    apply(drop, &widen(x)).iter().zip(residual).map(|(a, &b)| a + b as f64).collect()
}

/// y = LayerNorm(Dropout(x) + residual); returns (y, mean, rstd).
pub fn dropout_residual_layernorm_forward(
    x: &[f32],
    drop: DropoutSpec,
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = dropped_input(x, drop, residual);
    let (y, mean, rstd) = forward_f64(&s, &widen(gamma), &widen(beta), eps as f64);
    (narrow(&y), narrow(&mean), narrow(&rstd))
}

/// (ds, dx, dgamma, dbeta): ds is the residual's gradient, dx = Dropout(ds) the gradient of
/// x before dropout.
pub fn dropout_residual_layernorm_backward(
    x: &[f32],
    drop: DropoutSpec,
    residual: &[f32],
    gamma: &[f32],
    dy: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = dropped_input(x, drop, residual);
    let (ds, dgamma, dbeta) = backward_f64(&s, &widen(gamma), &widen(dy), eps as f64);
    (narrow(&ds), narrow(&apply(drop, &ds)), narrow(&dgamma), narrow(&dbeta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{finite_difference, random_vec};

    /// The loss sum(w * y) whose gradient with respect to y is w.
    fn loss(s: &[f64], gamma: &[f64], beta: &[f64], w: &[f64], eps: f64) -> f64 {
        let (y, _, _) = forward_f64(s, gamma, beta, eps);
        y.iter().zip(w).map(|(a, b)| a * b).sum()
    }

    fn check(what: &str, analytic: &[f64], i: usize, fd: f64) {
        let a = analytic[i];
        assert!((a - fd).abs() < 1e-6 * (1.0 + fd.abs()), "{what}[{i}]: analytic {a} finite difference {fd}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let eps = 1e-5;
        for (m, n) in [(1, 1), (1, 2), (3, 5), (2, 17)] {
            let s = widen(&random_vec(m * n, 1, 2.0));
            let gamma: Vec<f64> = widen(&random_vec(n, 2, 1.0)).iter().map(|g| 1.0 + g).collect();
            let beta = widen(&random_vec(n, 3, 1.0));
            let w = widen(&random_vec(m * n, 4, 1.0));
            let (ds, dgamma, dbeta) = backward_f64(&s, &gamma, &w, eps);
            let h = 1e-5;
            for i in 0..m * n {
                let fd = finite_difference(&s, i, h, &|v| loss(v, &gamma, &beta, &w, eps));
                check("ds", &ds, i, fd);
            }
            for i in 0..n {
                let fd = finite_difference(&gamma, i, h, &|v| loss(&s, v, &beta, &w, eps));
                check("dgamma", &dgamma, i, fd);
                let fd = finite_difference(&beta, i, h, &|v| loss(&s, &gamma, v, &w, eps));
                check("dbeta", &dbeta, i, fd);
            }
        }
    }

    /// The fused form's gradients of x (through the mask) and of the residual.
    #[test]
    fn dropout_residual_backward_matches_finite_differences() {
        let (m, n, eps) = (3, 7, 1e-5);
        let drop = DropoutSpec { p: 0.3, seed: 5, stream: 9, shard: 0 };
        let x = random_vec(m * n, 11, 2.0);
        let residual = random_vec(m * n, 12, 1.0);
        let gamma: Vec<f32> = random_vec(n, 13, 0.5).iter().map(|g| 1.0 + g).collect();
        let beta = random_vec(n, 14, 0.5);
        let w = widen(&random_vec(m * n, 15, 1.0));
        let (ds, dx, _, _) =
            dropout_residual_layernorm_backward(&x, drop, &residual, &gamma, &narrow(&w), eps);
        let (g, b) = (widen(&gamma), widen(&beta));
        let through = |x: &[f64], r: &[f64]| {
            let s: Vec<f64> = apply(drop, x).iter().zip(r).map(|(a, b)| a + b).collect();
            loss(&s, &g, &b, &w, eps as f64)
        };
        let (xs, rs) = (widen(&x), widen(&residual));
        let mut dropped = 0;
        for i in 0..m * n {
            let fd = finite_difference(&xs, i, 1e-4, &|v| through(v, &rs));
            assert!((dx[i] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()), "dx[{i}]: {} vs {fd}", dx[i]);
            dropped += (fd == 0.0) as usize;
            let fd = finite_difference(&rs, i, 1e-4, &|v| through(&xs, v));
            assert!((ds[i] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()), "ds[{i}]: {} vs {fd}", ds[i]);
        }
        assert!(
            dropped > 0 && dropped < m * n,
            "p = 0.3 should drop some of {} elements, dropped {dropped}",
            m * n
        );
    }

    #[test]
    fn forward_normalises_rows() {
        let x = random_vec(3 * 40, 5, 3.0);
        let r = random_vec(3 * 40, 6, 3.0);
        let (y, mean, rstd) = layernorm_forward(&x, Some(&r), &[1.0; 40], &[0.0; 40], 1e-12);
        for (k, row) in y.chunks_exact(40).enumerate() {
            let mu = row.iter().map(|&v| v as f64).sum::<f64>() / 40.0;
            let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / 40.0;
            assert!(mu.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "row {k}: {mu} {var}");
            let s: f64 = (0..40).map(|c| x[k * 40 + c] as f64 + r[k * 40 + c] as f64).sum();
            assert!((mean[k] as f64 - s / 40.0).abs() < 1e-6);
            assert!(rstd[k] > 0.0);
        }
    }
}
