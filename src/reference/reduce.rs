//! Column sums on the CPU, in f64.

/// out[n] = sum over m of x[m, n] for x [M, N].
pub fn colsum(x: &[f32], n: usize) -> Vec<f32> {
    let mut sums = vec![0.0f64; n];
    for row in x.chunks_exact(n.max(1)) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    sums.iter().map(|&s| s as f32).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn colsum_sums_columns() {
        let x = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0];
        assert_eq!(super::colsum(&x, 3), vec![11.0, 22.0, 33.0]);
        assert_eq!(super::colsum(&x, 1), vec![66.0]);
    }
}
