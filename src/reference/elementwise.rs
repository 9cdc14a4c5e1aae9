//! GELU (exact erf), tanh, dropout and adds on the CPU, in f64.

use super::rng;
use crate::contract::DropoutSpec;

/// erf by its Maclaurin series near zero and a continued fraction for erfc further out,
/// accurate to ~1e-15: independent of the GPU's polynomial fit.
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let value = if z < 2.5 {
        let mut term = z;
        let mut sum = z;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -z * z / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Lentz's continued fraction for erfc(z) = exp(-z^2)/sqrt(pi) * 1/(z + 1/2/(z + 1/(z + ...))).
        let mut f = z;
        for k in (1..60).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    value.copysign(x)
}

pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

pub fn gelu_grad(x: f64) -> f64 {
    let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    cdf + x * pdf
}

pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| gelu(v as f64) as f32).collect()
}

pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter().zip(dy).map(|(&v, &g)| (g as f64 * gelu_grad(v as f64)) as f32).collect()
}

pub fn tanh_forward(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| (v as f64).tanh() as f32).collect()
}

/// d tanh(x)/dx from the forward output y = tanh(x).
pub fn tanh_grad(y: f64) -> f64 {
    1.0 - y * y
}

/// From the forward output y.
pub fn tanh_backward(y: &[f32], dy: &[f32]) -> Vec<f32> {
    y.iter().zip(dy).map(|(&t, &g)| (g as f64 * tanh_grad(t as f64)) as f32).collect()
}

/// x ⊙ keep / (1 − p) in f64; with the same arguments it is also its own backward.
pub fn dropout_f64(x: &[f64], drop: &DropoutSpec) -> Vec<f64> {
    let scale = if drop.p >= 1.0 { 0.0 } else { 1.0 / (1.0 - drop.p as f64) };
    let first = drop.first_index(x.len());
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let index = first.wrapping_add(i as u32);
            if rng::keep(drop.seed, drop.stream, index, drop.p) { v * scale } else { 0.0 }
        })
        .collect()
}

pub fn dropout(x: &[f32], drop: &DropoutSpec) -> Vec<f32> {
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    dropout_f64(&x, drop).into_iter().map(|v| v as f32).collect()
}

/// a + b in f64, rounded once to f32: the correctly rounded f32 sum (f64 has more than
/// twice f32's precision, so the double rounding is harmless), which the GPU's one f32 add
/// must match exactly.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "add: lengths");
    a.iter().zip(b).map(|(&x, &y)| (x as f64 + y as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // erf(0.5), erf(1), erf(2), erf(3) from tables.
        for (x, want) in [
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.0, 0.9999779095030014),
        ] {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {} want {want}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-13);
        }
    }

    #[test]
    fn gelu_grad_matches_finite_differences() {
        for x in [-4.0, -1.3, -0.2, 0.0, 0.7, 2.9] {
            let fd = (gelu(x + 1e-6) - gelu(x - 1e-6)) / 2e-6;
            assert!((fd - gelu_grad(x)).abs() < 1e-8, "x={x}: fd {fd} analytic {}", gelu_grad(x));
        }
    }

    #[test]
    fn dropout_drops_about_p() {
        let x = vec![1.0f32; 100_000];
        let y = dropout(&x, &DropoutSpec { p: 0.1, seed: 7, stream: 3, shard: 0 });
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped fraction {dropped}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
    }

    #[test]
    fn shards_draw_the_whole_tensors_mask() {
        // 3 equal slices (ranks) of a 3 x 7 tensor: together they draw the whole's mask.
        let x = crate::reference::random_vec(21, 4, 1.0);
        let spec = |shard| DropoutSpec { p: 0.5, seed: 11, stream: 6, shard };
        let whole = dropout(&x, &spec(0));
        let slices: Vec<f32> =
            x.chunks(7).enumerate().flat_map(|(r, xs)| dropout(xs, &spec(r as u32))).collect();
        assert_eq!(whole, slices);
        assert_ne!(dropout(&x[7..14], &spec(0)), whole[7..14], "shard 0 redraws the first slice's mask");
    }

    #[test]
    fn add_is_the_rounded_f32_sum() {
        let a = crate::reference::random_vec(1000, 1, 3.0);
        let mut b = crate::reference::random_vec(1000, 2, 1e-3);
        b[0] = -a[0];
        b[1] = f32::MAX;
        let sum = add(&a, &b);
        for ((x, y), s) in a.iter().zip(&b).zip(&sum) {
            assert_eq!(s.to_bits(), (x + y).to_bits(), "{x} + {y}");
        }
        assert_eq!(sum[0], 0.0);
    }
}
