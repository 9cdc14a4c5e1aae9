// Elementwise activations and dropout, forward and backward, and adds.
//
// gelu_forward / tanh_forward:   y[i] = f(x[i])
//   bindings: 0 params, 1 x (read), 2 y (write)
// gelu_backward / tanh_backward: dx[i] = dy[i] * f'(x[i])    (tanh_backward takes y = tanh(x))
//   bindings: 0 params, 1 x (read), 2 dy (read), 3 dx (write)
// dropout:                       y[i] = keep(first_index + i) ? x[i] * scale : 0 (its own backward)
//   bindings: 0 params, 1 x (read), 2 y (write)
// copy:                          y[i] = x[i]
//   bindings: 0 params, 1 x (read), 2 y (write)
// add_assign:                    y[i] += x[i]
//   bindings: 0 params, 1 x (read), 2 y (read_write)
// add:                           total[i] = x[i] + addend[i]
//   bindings: 0 params, 1 x (read), 2 addend (read), 3 total (write)
// Dispatch: ceil(n / 256) workgroups of 256, spread over x and y (see gpu::spread).
// GELU is the exact erf form; erf is Abramowitz-Stegun 7.1.26 refined to f32 precision.
//
// Element types: B1_TYPE, B2_TYPE, B3_TYPE name the storage of bindings 1, 2 and 3 (f32 or
// f16; aliases prepended by the host, with `enable f16;` where one is f16). Every load
// widens to f32 and the arithmetic is f32: mixed precision keeps the FFN's intermediate
// activations (GELU's input and output, their gradients) in f16.

struct Params {
    n: u32,
    seed: u32,
    stream: u32,
    threshold: u32,   // dropout: drop when draw < threshold = p * 2^32
    scale: f32,       // dropout: 1 / (1 - p)
    first_index: u32, // dropout: the mask index of element 0 (a rank's slice of the batch)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<B1_TYPE>;
@group(0) @binding(2) var<storage, read_write> y: array<B2_TYPE>;
@group(0) @binding(2) var<storage, read> dy: array<B2_TYPE>;
@group(0) @binding(3) var<storage, read_write> dx: array<B3_TYPE>;
@group(0) @binding(2) var<storage, read> addend: array<B2_TYPE>;
@group(0) @binding(3) var<storage, read_write> total: array<B3_TYPE>;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// Some drivers' tanh overflows to NaN for large |v|; this form cannot.
fn safe_tanh(v: f32) -> f32 {
    let e = exp(-2.0 * abs(v));
    return sign(v) * (1.0 - e) / (1.0 + e);
}

@compute @workgroup_size(256)
fn gelu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) { y[i] = B2_TYPE(gelu(f32(x[i]))); }
}

@compute @workgroup_size(256)
fn gelu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) { dx[i] = B3_TYPE(f32(dy[i]) * gelu_grad(f32(x[i]))); }
}

@compute @workgroup_size(256)
fn tanh_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) { y[i] = B2_TYPE(safe_tanh(f32(x[i]))); }
}

// Takes the forward OUTPUT in x: d tanh = 1 - tanh^2.
@compute @workgroup_size(256)
fn tanh_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) {
        let t = f32(x[i]);
        dx[i] = B3_TYPE(f32(dy[i]) * (1.0 - t * t));
    }
}

@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) {
        let keep = rng_keep(params.seed, params.stream, params.first_index + i, params.threshold);
        y[i] = B2_TYPE(select(0.0, f32(x[i]) * params.scale, keep));
    }
}

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) { y[i] = B2_TYPE(f32(x[i])); }
}

// One f32 add per element: the result is exactly the rounded sum, on any device.
@compute @workgroup_size(256)
fn add_assign(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) { y[i] = B2_TYPE(f32(y[i]) + f32(x[i])); }
}

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < params.n) { total[i] = B3_TYPE(f32(x[i]) + f32(addend[i])); }
}
