// LayerNorm over the last dimension with an optional fused residual add and an optional
// fused dropout of x, HF BERT semantics:
// s = Dropout(x) + residual, y = (s - mean) * rstd * gamma + beta,
// rstd = 1 / sqrt(biased var + eps).
// HAS_RESIDUAL (a `const bool` the host prepends) says whether `residual` is read; without
// one the host binds x in its place. HAS_DROPOUT (also prepended) says whether x passes
// through dropout (rng.wgsl's mask of (seed, stream, element), regenerated in the backward,
// so a sublayer's output is read once, not written again dropped and read back). WG, the
// workgroup size, is the row length rounded up to a power of two within 32..256 (prepended).
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
// layernorm_dropout_backward: the bindings of layernorm_backward and 9 d_input [M, N]
//   (read_write), the same dispatch: dx as above (the residual's gradient) and
//   d_input = Dropout(dx) with the forward's mask, the gradient of x (before dropout).
//   With HAS_DROPOUT false, x was stored already dropped (a matmul's dropout epilogue):
//   only d_input uses the mask.

const ROWS_PER_GROUP: u32 = 8u;

struct Params {
    m: u32,
    n: u32,
    eps: f32,
    groups: u32,     // backward: G, the stride between the two halves of partials
    seed: u32,       // dropout: the mask's seed and stream
    stream: u32,
    threshold: u32,  // dropout: drop when draw < threshold = p * 2^32
    scale: f32,      // dropout: 1 / (1 - p)
    first_index: u32, // dropout: the mask index of element 0 (a rank's slice of the batch)
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
@group(0) @binding(9) var<storage, read_write> d_input: array<f32>;

var<workgroup> shared_sums: array<vec2<f32>, WG>;
// rng_u32's hash of (seed, stream), the same for every element: set once per invocation.
var<private> stream_key: u32;

fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn set_stream_key() {
    stream_key = pcg_hash(params.stream ^ pcg_hash(params.seed));
}

// Dropout(v) at element i: rng_keep(seed, stream, first_index + i, threshold) with the
// hoisted key.
fn dropped(v: f32, i: u32) -> f32 {
    let draw = pcg_hash((params.first_index + i) ^ stream_key);
    return select(0.0, v * params.scale, draw >= params.threshold);
}

// The LayerNorm input s at element i.
fn ln_input(i: u32) -> f32 {
    var s = x[i];
    if (HAS_DROPOUT) {
        s = dropped(s, i);
    }
    if (HAS_RESIDUAL) {
        s += residual[i];
    }
    return s;
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
    set_stream_key();
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

// (mean(g), mean(g * xhat)) over one row, g = dy * gamma: what dx needs.
fn row_means(base: u32, row_mean: f32, row_rstd: f32, lid: u32) -> vec2<f32> {
    var sums = vec2(0.0);
    for (var c = lid; c < params.n; c += WG) {
        let xhat = (ln_input(base + c) - row_mean) * row_rstd;
        let g = dy[base + c] * gamma[c];
        sums += vec2(g, g * xhat);
    }
    return workgroup_sum(sums, lid) / f32(params.n);
}

// dx at column c of the row starting at base.
fn dx_at(base: u32, c: u32, row_mean: f32, row_rstd: f32, means: vec2<f32>) -> f32 {
    let xhat = (ln_input(base + c) - row_mean) * row_rstd;
    let g = dy[base + c] * gamma[c];
    return row_rstd * (g - means.x - xhat * means.y);
}

// Column partials for the block of rows first..end: each invocation owns whole columns.
fn column_partials(group_id: u32, first: u32, end: u32, lid: u32) {
    let n = params.n;
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

@compute @workgroup_size(WG)
fn layernorm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let group_id = group_index(wid, nwg);
    if (group_id >= params.groups) {
        return;
    }
    set_stream_key();
    let first = group_id * ROWS_PER_GROUP;
    let end = min(first + ROWS_PER_GROUP, params.m);
    for (var row = first; row < end; row++) {
        let base = row * params.n;
        let means = row_means(base, mean[row], rstd[row], lid);
        for (var c = lid; c < params.n; c += WG) {
            dx[base + c] = dx_at(base, c, mean[row], rstd[row], means);
        }
    }
    column_partials(group_id, first, end, lid);
}

@compute @workgroup_size(WG)
fn layernorm_dropout_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let group_id = group_index(wid, nwg);
    if (group_id >= params.groups) {
        return;
    }
    set_stream_key();
    let first = group_id * ROWS_PER_GROUP;
    let end = min(first + ROWS_PER_GROUP, params.m);
    for (var row = first; row < end; row++) {
        let base = row * params.n;
        let means = row_means(base, mean[row], rstd[row], lid);
        for (var c = lid; c < params.n; c += WG) {
            let ds = dx_at(base, c, mean[row], rstd[row], means);
            dx[base + c] = ds;
            d_input[base + c] = dropped(ds, base + c);
        }
    }
    column_partials(group_id, first, end, lid);
}
