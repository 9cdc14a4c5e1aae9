//! Matrix products on the CPU: C = op(A)·op(B), and the backward of a Linear layer.

/// op(A)[i, p] for A stored [M, K] (or [K, M] when transposed).
fn at(a: &[f64], rows: usize, cols: usize, trans: bool, i: usize, p: usize) -> f64 {
    if trans { a[p * rows + i] } else { a[i * cols + p] }
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// C[M, N] = op(A)·op(B) in f64, packed operands.
pub fn matmul_f64(
    a: &[f64],
    b: &[f64],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f64> {
    assert_eq!(a.len(), m * k, "A");
    assert_eq!(b.len(), k * n, "B");
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut sum = 0.0f64;
            for p in 0..k {
                // op(B)[p, j] for B stored [K, N] (or [N, K]).
                let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                sum += at(a, m, k, trans_a, i, p) * bv;
            }
            c[i * n + j] = sum;
        }
    }
    c
}

/// C[M, N] = op(A)·op(B), packed operands, f64 sums.
pub fn matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Vec<f32> {
    narrow(&matmul_f64(&widen(a), &widen(b), m, n, k, trans_a, trans_b))
}

/// `linear_forward` in f64.
pub fn linear_forward_f64(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let mut y = matmul_f64(x, w, m, n, k, false, true);
    if let Some(bias) = bias {
        for row in y.chunks_mut(n) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
    y
}

/// y[M, N] = x[M, K]·Wᵀ + b, with W [N, K] as Hugging Face's Linear stores it.
pub fn linear_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let bias = bias.map(widen);
    narrow(&linear_forward_f64(&widen(x), &widen(w), bias.as_deref(), m, n, k))
}

/// `linear_backward` in f64: (dx [M, K], dW [N, K], db [N]).
pub fn linear_backward_f64(
    x: &[f64],
    w: &[f64],
    dy: &[f64],
    m: usize,
    n: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; m * k];
    let mut dw = vec![0.0; n * k];
    let mut db = vec![0.0; n];
    for i in 0..m {
        for p in 0..k {
            dx[i * k + p] = (0..n).map(|j| dy[i * n + j] * w[j * k + p]).sum::<f64>();
        }
    }
    for j in 0..n {
        for p in 0..k {
            dw[j * k + p] = (0..m).map(|i| dy[i * n + j] * x[i * k + p]).sum::<f64>();
        }
        db[j] = (0..m).map(|i| dy[i * n + j]).sum::<f64>();
    }
    (dx, dw, db)
}

/// Gradients of `linear_forward`: (dx [M, K], dW [N, K], db [N]).
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (dx, dw, db) = linear_backward_f64(&widen(x), &widen(w), &widen(dy), m, n, k);
    (narrow(&dx), narrow(&dw), narrow(&db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{finite_difference, random_vec};

    #[test]
    fn transposes_agree() {
        let (m, n, k) = (3, 4, 5);
        let a = random_vec(m * k, 1, 1.0);
        let b = random_vec(k * n, 2, 1.0);
        let c = matmul(&a, &b, m, n, k, false, false);
        let transpose = |x: &[f32], r: usize, cols: usize| {
            (0..cols)
                .flat_map(|j| (0..r).map(move |i| (i, j)))
                .map(|(i, j)| x[i * cols + j])
                .collect::<Vec<_>>()
        };
        assert_eq!(c, matmul(&transpose(&a, m, k), &b, m, n, k, true, false));
        assert_eq!(c, matmul(&a, &transpose(&b, k, n), m, n, k, false, true));
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let (m, n, k) = (3, 2, 4);
        let x = random_vec(m * k, 3, 1.0);
        let w = random_vec(n * k, 4, 1.0);
        let bias = random_vec(n, 5, 1.0);
        let dy = random_vec(m * n, 6, 1.0);
        let (dx, dw, db) = linear_backward(&x, &w, &dy, m, n, k);
        // loss = Σ dy ⊙ y, so dloss/dθ is what the backward returns.
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut total = 0.0;
            for i in 0..m {
                for j in 0..n {
                    let y = b[j] + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>();
                    total += dy[i * n + j] as f64 * y;
                }
            }
            total
        };
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&bias));
        for i in 0..x.len() {
            let fd = finite_difference(&x64, i, 1e-6, &|x| loss(x, &w64, &b64));
            assert!((fd - dx[i] as f64).abs() < 1e-5, "dx[{i}]");
        }
        for i in 0..w.len() {
            let fd = finite_difference(&w64, i, 1e-6, &|w| loss(&x64, w, &b64));
            assert!((fd - dw[i] as f64).abs() < 1e-5, "dw[{i}]");
        }
        for i in 0..n {
            let fd = finite_difference(&b64, i, 1e-6, &|b| loss(&x64, &w64, b));
            assert!((fd - db[i] as f64).abs() < 1e-5, "db[{i}]");
        }
    }
}
