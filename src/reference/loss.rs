//! Weighted-mean softmax cross-entropy and mean squared error on the CPU, in f64.
//! Normaliser N = max(Σ w_b, 1); an example whose label is ≥ C counts as masked.

/// (loss, dlogits) for logits [B, C] row-major; dlogits are multiplied by `grad_scale`.
pub fn cross_entropy_f64(
    logits: &[f64],
    labels: &[u32],
    weights: &[f64],
    classes: usize,
    grad_scale: f64,
) -> (f64, Vec<f64>) {
    let weight = |b: usize| {
        if (labels[b] as usize) < classes { weights[b] } else { 0.0 }
    };
    let n = (0..labels.len()).map(weight).sum::<f64>().max(1.0);
    let mut loss = 0.0;
    let mut grad = vec![0.0; logits.len()];
    for (b, row) in logits.chunks(classes).enumerate() {
        let w = weight(b);
        if w == 0.0 {
            continue;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
        let label = labels[b] as usize;
        loss += w * (max + sum.ln() - row[label]);
        for (c, x) in row.iter().enumerate() {
            let onehot = if c == label { 1.0 } else { 0.0 };
            grad[b * classes + c] = grad_scale * w * ((x - max).exp() / sum - onehot) / n;
        }
    }
    (loss / n, grad)
}

/// (loss, dpred) for predictions [B] against targets [B]; dpred is multiplied by `grad_scale`.
pub fn mse_f64(predictions: &[f64], targets: &[f64], weights: &[f64], grad_scale: f64) -> (f64, Vec<f64>) {
    let n = weights.iter().sum::<f64>().max(1.0);
    let mut loss = 0.0;
    let mut grad = vec![0.0; predictions.len()];
    for b in 0..predictions.len() {
        let (w, d) = (weights[b], predictions[b] - targets[b]);
        if w != 0.0 {
            loss += w * d * d;
            grad[b] = grad_scale * 2.0 * w * d / n;
        }
    }
    (loss / n, grad)
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// `cross_entropy_f64` on f32 storage.
pub fn cross_entropy(
    logits: &[f32],
    labels: &[u32],
    weights: &[f32],
    classes: usize,
    grad_scale: f32,
) -> (f32, Vec<f32>) {
    let (loss, grad) = cross_entropy_f64(&widen(logits), labels, &widen(weights), classes, grad_scale as f64);
    (loss as f32, narrow(&grad))
}

/// `mse_f64` on f32 storage.
pub fn mse(predictions: &[f32], targets: &[f32], weights: &[f32], grad_scale: f32) -> (f32, Vec<f32>) {
    let (loss, grad) = mse_f64(&widen(predictions), &widen(targets), &widen(weights), grad_scale as f64);
    (loss as f32, narrow(&grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{finite_difference, random_vec};

    fn check_gradient(x: &[f64], analytic: &[f64], f: &dyn Fn(&[f64]) -> f64) {
        for (i, &want) in analytic.iter().enumerate() {
            let fd = finite_difference(x, i, 1e-5, f);
            assert!((fd - want).abs() < 1e-8, "element {i}: fd {fd} analytic {want}");
        }
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let (batch, classes) = (5, 4);
        let logits = widen(&random_vec(batch * classes, 11, 3.0));
        // Example 1 is masked by weight, example 3 by an out-of-range label.
        let labels = [2, 0, 3, 7, 1];
        let weights = [1.0, 0.0, 1.0, 1.0, 0.5];
        let (_, grad) = cross_entropy_f64(&logits, &labels, &weights, classes, 1.0);
        check_gradient(&logits, &grad, &|x| cross_entropy_f64(x, &labels, &weights, classes, 1.0).0);
        assert!(grad[4..8].iter().chain(&grad[12..16]).all(|&g| g == 0.0));
        let (_, scaled) = cross_entropy_f64(&logits, &labels, &weights, classes, 8.0);
        for (s, g) in scaled.iter().zip(&grad) {
            assert!((s - 8.0 * g).abs() < 1e-15);
        }
    }

    #[test]
    fn cross_entropy_known_value() {
        // Two equal logits: CE = ln 2; the two real examples are averaged, padding ignored.
        let (loss, grad) =
            cross_entropy_f64(&[0.0, 0.0, 1.0, 1.0, 5.0, -5.0], &[0, 1, 0], &[1.0, 1.0, 0.0], 2, 1.0);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(grad, vec![-0.25, 0.25, 0.25, -0.25, 0.0, 0.0]);
    }

    #[test]
    fn mse_gradient_matches_finite_differences() {
        let predictions = widen(&random_vec(6, 12, 2.0));
        let targets = widen(&random_vec(6, 13, 2.0));
        let weights = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let (loss, grad) = mse_f64(&predictions, &targets, &weights, 1.0);
        check_gradient(&predictions, &grad, &|x| mse_f64(x, &targets, &weights, 1.0).0);
        let want: f64 =
            [0, 1, 3, 4].iter().map(|&b| (predictions[b] - targets[b]).powi(2)).sum::<f64>() / 4.0;
        assert!((loss - want).abs() < 1e-15);
    }

    #[test]
    fn all_masked_batch_is_zero() {
        let (loss, grad) = cross_entropy_f64(&[1.0, 2.0, 3.0], &[0, 1, 2], &[0.0; 3], 1, 1.0);
        assert_eq!((loss, grad), (0.0, vec![0.0; 3]));
        let (loss, grad) = mse_f64(&[1.0, 2.0], &[0.0, 0.0], &[0.0, 0.0], 1.0);
        assert_eq!((loss, grad), (0.0, vec![0.0; 2]));
    }
}
