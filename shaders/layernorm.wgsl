// LayerNorm over the last dimension with an optional fused residual add, HF BERT semantics:
// s = x + residual, y = (s - mean) * rstd * gamma + beta, rstd = 1 / sqrt(biased var + eps).
// HAS_RESIDUAL (a `const bool` the host prepends) says whether `residual` is read; without
// one the host binds x in its place. WG, the workgroup size, is the row length rounded up
// to a power of two within 32..256 (also prepended).
//
// layernorm_forward: bindings 0 params, 1 x [M, N], 2 residual [M, N], 3 gamma [N], 4 beta [N]
//   (read), 5 y [M, N], 6 mean_out [M], 7 rstd_out [M] (read_write).
//   Dispatch: M workgroups of WG (spread over x and y), one row each. Mean, then variance
//   of (s - mean): two passes over the row, which stays in cache, so large means cannot
//   cancel the variance away.
// layernorm_backward: bindings 0 params, 1 x, 2 residual, 3 gamma, 4 dy [M, N], 5 mean [M],
//   6 rstd [M] (read), 7 dx [M, N], 8 partials [2, G, N] (read_write).
//   Dispatch: G = ceil(M / ROWS_PER_GROUP) workgroups of WG (spread), each owning a block
//   of rows. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gamma; dx is
//   also the residual's gradient. partials[0, G, :] = sum over the block of dy * xhat and
//   partials[1, G, :] = sum of dy; the host column-sums them (reduce.wgsl) into dgamma and
//   dbeta, so no atomics and a fixed order.

const ROWS_PER_GROUP: u32 = 8u;

struct Params {
    m: u32,
    n: u32,
    eps: f32,
    groups: u32,   // backward: G, the stride between the two halves of partials
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> residual: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read> mean: array<f32>;
@group(0) @binding(6) var<storage, read> rstd: array<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;
@group(0) @binding(8) var<storage, read_write> partials: array<f32>;

var<workgroup> shared_sums: array<vec2<f32>, WG>;

fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// The LayerNorm input s at element i.
fn ln_input(i: u32) -> f32 {
    if (HAS_RESIDUAL) {
        return x[i] + residual[i];
    }
    return x[i];
}

// Sum over the workgroup in a fixed tree order; every invocation gets the total.
fn workgroup_sum(value: vec2<f32>, lid: u32) -> vec2<f32> {
    shared_sums[lid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            shared_sums[lid] += shared_sums[lid + stride];
        }
        workgroupBarrier();
    }
    let total = shared_sums[0];
    workgroupBarrier();  // before the next call overwrites shared_sums
    return total;
}

@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= params.m) {
        return;
    }
    let n = params.n;
    let base = row * n;
    var sum = 0.0;
    for (var c = lid; c < n; c += WG) {
        sum += ln_input(base + c);
    }
    let row_mean = workgroup_sum(vec2(sum, 0.0), lid).x / f32(n);
    var squares = 0.0;
    for (var c = lid; c < n; c += WG) {
        let d = ln_input(base + c) - row_mean;
        squares += d * d;
    }
    let variance = workgroup_sum(vec2(squares, 0.0), lid).x / f32(n);
    let row_rstd = 1.0 / sqrt(variance + params.eps);
    for (var c = lid; c < n; c += WG) {
        y[base + c] = (ln_input(base + c) - row_mean) * row_rstd * gamma[c] + beta[c];
    }
    if (lid == 0u) {
        mean_out[row] = row_mean;
        rstd_out[row] = row_rstd;
    }
}

@compute @workgroup_size(WG)
fn layernorm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let group_id = group_index(wid, nwg);
    if (group_id >= params.groups) {
        return;
    }
    let n = params.n;
    let first = group_id * ROWS_PER_GROUP;
    let end = min(first + ROWS_PER_GROUP, params.m);
    for (var row = first; row < end; row++) {
        let base = row * n;
        let row_mean = mean[row];
        let row_rstd = rstd[row];
        var sums = vec2(0.0);
        for (var c = lid; c < n; c += WG) {
            let xhat = (ln_input(base + c) - row_mean) * row_rstd;
            let g = dy[base + c] * gamma[c];
            sums += vec2(g, g * xhat);
        }
        let means = workgroup_sum(sums, lid) / f32(n);
        for (var c = lid; c < n; c += WG) {
            let xhat = (ln_input(base + c) - row_mean) * row_rstd;
            let g = dy[base + c] * gamma[c];
            dx[base + c] = row_rstd * (g - means.x - xhat * means.y);
        }
    }
    // Column partials for this block of rows: each invocation owns whole columns.
    for (var c = lid; c < n; c += WG) {
        var sums = vec2(0.0);
        for (var row = first; row < end; row++) {
            let i = row * n + c;
            let xhat = (ln_input(i) - mean[row]) * rstd[row];
            sums += vec2(dy[i] * xhat, dy[i]);
        }
        partials[group_id * n + c] = sums.x;
        partials[(params.groups + group_id) * n + c] = sums.y;
    }
}
