// Exact-erf GELU and its derivative, shared by elementwise.wgsl and matmul.wgsl's fused
// epilogue (the host concatenates this file in front of theirs). The Rust twin is
// src/reference/elementwise.rs, which computes erf independently.

// erf with |error| < 1.2e-7 (Numerical Recipes erfc, Chebyshev fit).
fn erf_f32(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277)))))))));
    return sign(v) * (1.0 - r);
}

fn gelu(v: f32) -> f32 {
    return 0.5 * v * (1.0 + erf_f32(v * 0.70710678118654752));
}

fn gelu_grad(v: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf_f32(v * 0.70710678118654752));
    let pdf = 0.39894228040143268 * exp(-0.5 * v * v);
    return cdf + v * pdf;
}
