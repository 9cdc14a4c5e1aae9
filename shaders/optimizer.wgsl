// Gradient norms, clip coefficients and the fused Adam update. A training step never reads
// back to the host: each tensor's squared norm goes to norms[slot], the clip factors to
// coef[slot], and adam_step reads its factor from there. All sums run in a fixed order
// (grid-stride loops of a fixed grid, then trees), so results are bit-identical across runs.
//
// sum_squares_partial: partials[g] = sum of grad[i]^2 over the elements of workgroup g
//   bindings: 0 norm_params, 1 grad [n] (read), 2 partials [>= groups] (write)
//   dispatch: groups = clamp(ceil(n / 1024), 1, 1024) workgroups of 256 along x; grid thread k
//             sums i = k, k + 256 * groups, ... (coalesced; ~88 elements a thread at 23M)
// sum_squares_final:   norms[slot] = sum_{g < groups} partials[g]
//   bindings: 0 norm_params, 1 partials (read), 2 norms [T] (write)
//   dispatch: 1 workgroup of 256
// clip_coefficients:   coef[t] = 1 (mode 0, none)
//                              = min(1, max_norm / (sqrt(sum_t norms[t]) + 1e-6)) (mode 1, global)
//                              = min(1, max_norm / (sqrt(norms[t]) + 1e-6))       (mode 2, per tensor)
//                      coef[T] = sqrt(sum_t norms[t]), the global norm, in every mode
//   bindings: 0 norm_params, 1 norms [T] (read), 2 coef [T + 1] (write)
//   dispatch: 1 workgroup of 256
// adam_step, in place for each element i:
//     g = grad[i] * coef[slot];  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//     param -= lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * param)
//   AdamW passes bc1 = 1 - b1^t, bc2 = 1 - b2^t; BERTAdam passes bc1 = bc2 = 1.
//   bindings: 0 adam, 1 grad [n] (read), 2 coef [>= slot + 1] (read), 3 param [n], 4 m [n],
//             5 v [n] (read_write)
//   dispatch: ceil(n / 256) workgroups of 256 spread over x/y (gpu::spread)

struct NormParams {
    n: u32,          // sum_squares: elements of grad; clip: tensors T
    groups: u32,     // sum_squares: partials written by the first stage
    slot: u32,
    mode: u32,
    max_norm: f32,
}

struct AdamParams {
    n: u32,
    slot: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
}

const MODE_GLOBAL: u32 = 1u;
const MODE_PER_TENSOR: u32 = 2u;

@group(0) @binding(0) var<uniform> norm_params: NormParams;
@group(0) @binding(0) var<uniform> adam: AdamParams;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read> partials_in: array<f32>;
@group(0) @binding(1) var<storage, read> norms: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> norms_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> coef_out: array<f32>;
@group(0) @binding(2) var<storage, read> coef: array<f32>;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read_write> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;


@compute @workgroup_size(256)
fn sum_squares_partial(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let stride = WG * norm_params.groups;
    var sum = 0.0;
    for (var i = wid.x * WG + lid; i < norm_params.n; i += stride) {
        let g = grad[i];
        sum += g * g;
    }
    let total = workgroup_sum(lid, sum);
    if (lid == 0u) {
        partials[wid.x] = total;
    }
}

@compute @workgroup_size(256)
fn sum_squares_final(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    for (var g = lid; g < norm_params.groups; g += WG) {
        sum += partials_in[g];
    }
    let total = workgroup_sum(lid, sum);
    if (lid == 0u) {
        norms_out[norm_params.slot] = total;
    }
}

// The 1e-6 keeps a zero norm finite: the factor is then 1 for any positive max_norm.
fn clip_factor(norm: f32) -> f32 {
    return min(1.0, norm_params.max_norm / (norm + 1e-6));
}

@compute @workgroup_size(256)
fn clip_coefficients(@builtin(local_invocation_index) lid: u32) {
    let tensors = norm_params.n;
    var sum = 0.0;
    for (var t = lid; t < tensors; t += WG) {
        sum += norms[t];
    }
    let global_norm = sqrt(workgroup_sum(lid, sum));
    for (var t = lid; t < tensors; t += WG) {
        var factor = 1.0;
        if (norm_params.mode == MODE_GLOBAL) {
            factor = clip_factor(global_norm);
        } else if (norm_params.mode == MODE_PER_TENSOR) {
            factor = clip_factor(sqrt(norms[t]));
        }
        coef_out[t] = factor;
    }
    if (lid == 0u) {
        coef_out[tensors] = global_norm;
    }
}

@compute @workgroup_size(256)
fn adam_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= adam.n) {
        return;
    }
    let g = grad[i] * coef[adam.slot];
    let m_new = adam.beta1 * m[i] + (1.0 - adam.beta1) * g;
    let v_new = adam.beta2 * v[i] + (1.0 - adam.beta2) * g * g;
    m[i] = m_new;
    v[i] = v_new;
    let update = (m_new / adam.bc1) / (sqrt(v_new / adam.bc2) + adam.eps);
    let p = param[i];
    param[i] = p - adam.lr * (update + adam.weight_decay * p);
}
