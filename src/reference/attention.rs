//! Multi-head self-attention on the CPU in f64, materialising the full probability matrix.
//! Layouts as the GPU kernel: q, k, v, o [B, S, H, D]; mask [B, S]; lse [B, H, S].

use super::rng;
use crate::contract::AttentionShape;
use crate::contract::DropoutSpec;

/// Offset of element 0 of row (b, s, h) in a [B, S, H, D] tensor.
fn row(shape: &AttentionShape, b: usize, s: usize, h: usize) -> usize {
    ((b * shape.seq + s) * shape.heads + h) * shape.head_dim
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// keep / (1 - p) for query i, key j of head (b, h), from the shared RNG.
fn dropout_factor(shape: &AttentionShape, drop: &DropoutSpec, bh: usize, i: usize, j: usize) -> f64 {
    if drop.p <= 0.0 {
        return 1.0;
    }
    // The GPU computes the index in u32 arithmetic, which wraps.
    let local = ((bh * shape.seq + i) * shape.seq + j) as u64 as u32;
    let index = drop.first_index(shape.rows_len() * shape.seq).wrapping_add(local);
    if rng::keep(drop.seed, drop.stream, index, drop.p) { 1.0 / (1.0 - drop.p as f64) } else { 0.0 }
}

/// Per head (b, h): the probabilities P [S, S] (query-major) and the row log-sum-exps [S].
fn probabilities(
    shape: &AttentionShape,
    q: &[f64],
    k: &[f64],
    mask: &[f64],
    scale: f64,
    b: usize,
    h: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (s, d) = (shape.seq, shape.head_dim);
    let mut p = vec![0.0; s * s];
    let mut lse = vec![0.0; s];
    for i in 0..s {
        let qi = &q[row(shape, b, i, h)..][..d];
        let scores = &mut p[i * s..(i + 1) * s];
        for (j, score) in scores.iter_mut().enumerate() {
            *score = dot(qi, &k[row(shape, b, j, h)..][..d]) * scale + mask[b * s + j];
        }
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
        lse[i] = max + sum.ln();
        for score in scores.iter_mut() {
            *score = (*score - lse[i]).exp();
        }
    }
    (p, lse)
}

/// o = (P ⊙ keep / (1 - p)) · v with P = softmax(q·kᵀ·scale + mask); returns (o, lse).
pub fn forward_f64(
    shape: &AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: &[f64],
    scale: f64,
    drop: &DropoutSpec,
) -> (Vec<f64>, Vec<f64>) {
    let (s, d) = (shape.seq, shape.head_dim);
    let mut o = vec![0.0; shape.qkv_len()];
    let mut lse = vec![0.0; shape.rows_len()];
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            let bh = b * shape.heads + h;
            let (p, head_lse) = probabilities(shape, q, k, mask, scale, b, h);
            lse[bh * s..(bh + 1) * s].copy_from_slice(&head_lse);
            for i in 0..s {
                let oi = row(shape, b, i, h);
                for j in 0..s {
                    let w = p[i * s + j] * dropout_factor(shape, drop, bh, i, j);
                    let vj = row(shape, b, j, h);
                    for e in 0..d {
                        o[oi + e] += w * v[vj + e];
                    }
                }
            }
        }
    }
    (o, lse)
}

/// (dq, dk, dv) of `forward_f64` for the output gradient `d_out`.
#[allow(clippy::too_many_arguments)]
pub fn backward_f64(
    shape: &AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: &[f64],
    d_out: &[f64],
    scale: f64,
    drop: &DropoutSpec,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (s, d) = (shape.seq, shape.head_dim);
    let mut dq = vec![0.0; shape.qkv_len()];
    let mut dk = vec![0.0; shape.qkv_len()];
    let mut dv = vec![0.0; shape.qkv_len()];
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            let bh = b * shape.heads + h;
            let (p, _) = probabilities(shape, q, k, mask, scale, b, h);
            for i in 0..s {
                let qi = row(shape, b, i, h);
                let doi = &d_out[qi..][..d];
                // dP[j] = dO_i · v_j * keep / (1 - p); softmax backward needs sum_j P dP.
                let dp: Vec<f64> = (0..s)
                    .map(|j| dot(doi, &v[row(shape, b, j, h)..][..d]) * dropout_factor(shape, drop, bh, i, j))
                    .collect();
                let delta: f64 = (0..s).map(|j| p[i * s + j] * dp[j]).sum();
                for j in 0..s {
                    let kj = row(shape, b, j, h);
                    let pij = p[i * s + j];
                    let ds = pij * (dp[j] - delta) * scale;
                    let w = pij * dropout_factor(shape, drop, bh, i, j);
                    for e in 0..d {
                        dq[qi + e] += ds * k[kj + e];
                        dk[kj + e] += ds * q[qi + e];
                        dv[kj + e] += w * doi[e];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn narrow(x: Vec<f64>) -> Vec<f32> {
    x.into_iter().map(|v| v as f32).collect()
}

/// `forward_f64` on f32 tensors: (o, lse).
pub fn forward(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    scale: f32,
    drop: &DropoutSpec,
) -> (Vec<f32>, Vec<f32>) {
    let (o, lse) = forward_f64(shape, &widen(q), &widen(k), &widen(v), &widen(mask), scale as f64, drop);
    (narrow(o), narrow(lse))
}

/// `backward_f64` on f32 tensors: (dq, dk, dv).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    d_out: &[f32],
    scale: f32,
    drop: &DropoutSpec,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (dq, dk, dv) =
        backward_f64(shape, &widen(q), &widen(k), &widen(v), &widen(mask), &widen(d_out), scale as f64, drop);
    (narrow(dq), narrow(dk), narrow(dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{finite_difference, random_vec};

    const SHAPE: AttentionShape = AttentionShape { batch: 2, seq: 4, heads: 2, head_dim: 3 };

    fn check_gradients(mask: &[f64], drop: DropoutSpec) {
        let n = SHAPE.qkv_len();
        let q = widen(&random_vec(n, 11, 1.5));
        let k = widen(&random_vec(n, 12, 1.5));
        let v = widen(&random_vec(n, 13, 1.0));
        let g = widen(&random_vec(n, 14, 1.0));
        let scale = 0.7;
        // loss = sum(o ⊙ g), so dL/do = g.
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            dot(&forward_f64(&SHAPE, q, k, v, mask, scale, &drop).0, &g)
        };
        let (dq, dk, dv) = backward_f64(&SHAPE, &q, &k, &v, mask, &g, scale, &drop);
        for i in 0..n {
            let fd_q = finite_difference(&q, i, 1e-5, &|x| loss(x, &k, &v));
            let fd_k = finite_difference(&k, i, 1e-5, &|x| loss(&q, x, &v));
            let fd_v = finite_difference(&v, i, 1e-5, &|x| loss(&q, &k, x));
            for (what, fd, analytic) in [("q", fd_q, dq[i]), ("k", fd_k, dk[i]), ("v", fd_v, dv[i])] {
                assert!(
                    (fd - analytic).abs() < 1e-7 * (1.0 + fd.abs()),
                    "d{what}[{i}]: fd {fd} analytic {analytic}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let no_mask = vec![0.0; SHAPE.mask_len()];
        let no_drop = DropoutSpec::NONE;
        check_gradients(&no_mask, no_drop);
    }

    #[test]
    fn gradients_match_finite_differences_with_padding_and_dropout() {
        // The second sequence has two padding keys.
        let mut mask = vec![0.0; SHAPE.mask_len()];
        mask[SHAPE.seq + 2] = -10000.0;
        mask[SHAPE.seq + 3] = -10000.0;
        let drop = DropoutSpec { p: 0.3, seed: 5, stream: 2, shard: 0 };
        let kept = (0..SHAPE.rows_len() * SHAPE.seq).filter(|&e| rng::keep(5, 2, e as u32, 0.3)).count();
        assert!(kept > 0 && kept < SHAPE.rows_len() * SHAPE.seq, "mask drops something");
        check_gradients(&mask, drop);
    }

    #[test]
    fn rows_sum_to_one_and_padding_gets_no_weight() {
        let n = SHAPE.qkv_len();
        let q = widen(&random_vec(n, 1, 1.0));
        let k = widen(&random_vec(n, 2, 1.0));
        let mut mask = vec![0.0; SHAPE.mask_len()];
        mask[SHAPE.seq + 3] = -10000.0;
        let (p, lse) = probabilities(&SHAPE, &q, &k, &mask, 0.5, 1, 1);
        for i in 0..SHAPE.seq {
            let sum: f64 = p[i * SHAPE.seq..(i + 1) * SHAPE.seq].iter().sum();
            assert!((sum - 1.0).abs() < 1e-12);
            assert!(p[i * SHAPE.seq + 3] < 1e-30);
            assert!(lse[i].is_finite());
        }
    }
}
