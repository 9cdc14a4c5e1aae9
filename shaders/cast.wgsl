// Element-type casts: the f16 copies mixed precision reads, made from f32 values (weights
// the optimizer keeps in f32, activations of kernels that write f32).
//
// cast_f16: dst[i] = f16(src[i]), to the nearest f16 (WGSL leaves ties and values beyond
//   ±65504 to the implementation; tests/cast.rs says what this adapter does).
//   bindings: 0 params, 1 src [n] f32 (read), 2 dst [n] f16 (write)
//   dispatch: ceil(n / 256) workgroups of 256 spread over x/y (gpu::spread)

enable f16;

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f16>;

@compute @workgroup_size(256)
fn cast_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < params.n) {
        dst[i] = f16(src[i]);
    }
}
