// Gradient norms, clip coefficients, the fused Adam update and dynamic loss scaling. A
// training step never reads back to the host: each tensor's squared norm goes to
// norms[slot], the clip factors to coef[slot], and adam_step reads its factor from there.
// All sums run in a fixed order (grid-stride loops of a fixed grid, then trees), so results
// are bit-identical across runs.
//
// Loss scaling (PyTorch's GradScaler, without a host sync): the loss backward multiplied
// every gradient by S = scaler[0]. clip_coefficients divides it out of the norms and the
// factors (so the clip norm is the unscaled gradient's, and adam_step unscales as it reads
// the factor) and raises found = coef[T + 1] when the summed squares are not finite (an
// inf or NaN anywhere makes them inf or NaN). adam_step leaves everything untouched while
// found is up; update_scaler then neither advances the tensors' step counts nor grows S,
// but halves it. Without scaling S stays 1, found stays 0 and the arithmetic is the plain
// f32 step's: S is a power of two, so scaling and unscaling are exact.
//
// sum_squares_partial: partials[g] = sum of grad[i]^2 over the elements of workgroup g
//   bindings: 0 norm_params, 1 grad [n] (read), 2 partials [>= groups] (write)
//   dispatch: groups = clamp(ceil(n / 1024), 1, 1024) workgroups of 256 along x; grid thread k
//             sums i = k, k + 256 * groups, ... (coalesced; ~88 elements a thread at 23M)
// sum_squares_final:   norms[slot] = sum_{g < groups} partials[g]
//   bindings: 0 norm_params, 1 partials (read), 2 norms [T] (write)
//   dispatch: 1 workgroup of 256
// clip_coefficients:   N = sqrt(sum_t norms[t]) / S, the unscaled global norm
//                      coef[t] = 1 / S (mode 0, none)
//                              = min(1, max_norm / (N + 1e-6)) / S (mode 1, global)
//                              = min(1, max_norm / (sqrt(norms[t]) / S + 1e-6)) / S (mode 2)
//                      coef[T] = N in every mode (for logging)
//                      coef[T + 1] = 1 if scaling and N is not finite, else 0 (found)
//   bindings: 0 norm_params, 1 norms [T] (read), 2 coef [T + 2] (write), 3 scaler [2] (read)
//   dispatch: 1 workgroup of 256
// adam_step, in place for each element i, unless coef[found] != 0:
//     t = steps[index] + 1;  g = grad[i] * coef[slot]
//     m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//     param -= lr * ((m / bc1(t)) / (sqrt(v / bc2(t)) + eps) + wd * param)
//   bc1(t), bc2(t) = corrections[2 (t - 1)], corrections[2 (t - 1) + 1] for t <= the table's
//   length, 1 beyond (the host's f64 values rounded to f32; the table ends where both
//   round to 1). BERTAdam passes an empty table.
//   With WRITE_HALF it also writes the updated value rounded to f16 into param_half, the
//   copy mixed precision's products read (one pass over param instead of a second cast).
//   bindings: 0 adam, 1 grad [n] (read), 2 coef [>= slot + 1] (read), 3 steps u32 (read),
//             4 corrections [2 L] (read), 5 param [n], 6 m [n], 7 v [n],
//             8 param_half [n] HALF (read_write; param again without WRITE_HALF)
//   dispatch: ceil(n / 256) workgroups of 256 spread over x/y (gpu::spread)
//   Where n is a multiple of 4, each invocation updates 4 consecutive elements as one
//   vec4 (V = vec4<f32>, HV = vec4<HALF>, adam.n = n / 4): the same arithmetic per
//   element, so the same bits, with a quarter of the loads (on lavapipe every load is a
//   loop over the SIMD lanes); else V = f32, HV = HALF.
// The host prepends `alias HALF = f16; const WRITE_HALF = true;` (after `enable f16;`) for
// adam_step with an f16 copy, `alias HALF = f32; const WRITE_HALF = false;` otherwise, and
// the aliases V and HV.
//
// update_scaler, after every adam_step of the step:
//     unless found: steps[ids[j]] += 1 for each j
//     record[slot] = S, record[slot + stride] = found (what the host reads with the loss)
//     scaling: found -> S *= 0.5, growth = 0;  else growth += 1, and at the interval
//              S *= 2 (if finite), growth = 0  (scaler = [S, growth])
//   bindings: 0 scaler_params, 1 coef (read), 2 ids u32 [J] (read), 3 steps u32 (read_write),
//             4 scaler [2] (read_write), 5 record (read_write)
//   dispatch: 1 workgroup of 256

struct NormParams {
    n: u32,          // sum_squares: elements of grad; clip: tensors T
    groups: u32,     // sum_squares: partials written by the first stage
    slot: u32,
    mode: u32,
    max_norm: f32,
    scaling: u32,    // clip: 1 when found may be raised
}

struct AdamParams {
    n: u32,
    slot: u32,
    found: u32,      // where coef holds the found flag
    index: u32,      // this tensor's entry in steps
    corrections: u32, // bias-correction pairs in the table

    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

struct ScalerParams {
    ids: u32,
    found: u32,
    slot: u32,
    stride: u32,
    scaling: u32,
    interval: u32,
}

const MODE_GLOBAL: u32 = 1u;
const MODE_PER_TENSOR: u32 = 2u;

@group(0) @binding(0) var<uniform> norm_params: NormParams;
@group(0) @binding(0) var<uniform> adam: AdamParams;
@group(0) @binding(0) var<uniform> scaler_params: ScalerParams;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read> grad_v: array<V>;
@group(0) @binding(1) var<storage, read> partials_in: array<f32>;
@group(0) @binding(1) var<storage, read> norms: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> norms_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> coef_out: array<f32>;
@group(0) @binding(2) var<storage, read> coef: array<f32>;
@group(0) @binding(1) var<storage, read> coef_in: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> scaler_in: array<f32>;
@group(0) @binding(3) var<storage, read> steps: array<u32>;
@group(0) @binding(3) var<storage, read_write> steps_out: array<u32>;
@group(0) @binding(4) var<storage, read> corrections: array<f32>;
@group(0) @binding(4) var<storage, read_write> scaler: array<f32>;
@group(0) @binding(5) var<storage, read_write> param: array<V>;
@group(0) @binding(5) var<storage, read_write> record: array<f32>;
@group(0) @binding(6) var<storage, read_write> m: array<V>;
@group(0) @binding(7) var<storage, read_write> v: array<V>;
@group(0) @binding(8) var<storage, read_write> param_half: array<HV>;


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

// WGSL has no isinf/isnan: an all-ones exponent is inf or NaN.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(256)
fn clip_coefficients(@builtin(local_invocation_index) lid: u32) {
    let tensors = norm_params.n;
    let scale = scaler_in[0];
    var sum = 0.0;
    for (var t = lid; t < tensors; t += WG) {
        sum += norms[t];
    }
    let global_norm = sqrt(workgroup_sum(lid, sum)) / scale;
    for (var t = lid; t < tensors; t += WG) {
        var factor = 1.0;
        if (norm_params.mode == MODE_GLOBAL) {
            factor = clip_factor(global_norm);
        } else if (norm_params.mode == MODE_PER_TENSOR) {
            factor = clip_factor(sqrt(norms[t]) / scale);
        }
        coef_out[t] = factor / scale;
    }
    if (lid == 0u) {
        coef_out[tensors] = global_norm;
        let found = norm_params.scaling != 0u && !is_finite(global_norm);
        coef_out[tensors + 1u] = select(0.0, 1.0, found);
    }
}

@compute @workgroup_size(256)
fn adam_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= adam.n || coef[adam.found] != 0.0) {
        return;
    }
    let t = steps[adam.index] + 1u;
    var bc1 = 1.0;
    var bc2 = 1.0;
    if (t <= adam.corrections) {
        bc1 = corrections[2u * (t - 1u)];
        bc2 = corrections[2u * (t - 1u) + 1u];
    }
    let g = grad_v[i] * coef[adam.slot];
    let m_new = adam.beta1 * m[i] + (1.0 - adam.beta1) * g;
    let v_new = adam.beta2 * v[i] + (1.0 - adam.beta2) * g * g;
    m[i] = m_new;
    v[i] = v_new;
    let update = (m_new / bc1) / (sqrt(v_new / bc2) + adam.eps);
    let p = param[i];
    let updated = p - adam.lr * (update + adam.weight_decay * p);
    param[i] = updated;
    if (WRITE_HALF) {
        param_half[i] = HV(updated);
    }
}

@compute @workgroup_size(256)
fn update_scaler(@builtin(local_invocation_index) lid: u32) {
    let found = coef_in[scaler_params.found] != 0.0;
    if (!found) {
        for (var j = lid; j < scaler_params.ids; j += WG) {
            steps_out[ids[j]] += 1u;
        }
    }
    if (lid != 0u) {
        return;
    }
    let scale = scaler[0];
    record[scaler_params.slot] = scale;
    record[scaler_params.slot + scaler_params.stride] = select(0.0, 1.0, found);
    if (scaler_params.scaling == 0u) {
        return;
    }
    if (found) {
        scaler[0] = scale * 0.5;
        scaler[1] = 0.0;
        return;
    }
    let growth = scaler[1] + 1.0;
    if (growth >= f32(scaler_params.interval)) {
        // As PyTorch: an overflowing growth keeps the old scale.
        scaler[0] = select(scale, scale * 2.0, is_finite(scale * 2.0));
        scaler[1] = 0.0;
    } else {
        scaler[1] = growth;
    }
}
