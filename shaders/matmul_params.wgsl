// The matmul kernels' parameter block (binding 0) and batch addressing, shared by the
// products (through matmul_io.wgsl) and matmul_pack.wgsl. Fields as `Matmul::params` fills
// them: sizes, row strides, element offsets, batch strides (two levels: z = outer · inner +
// i), the epilogue code and the dropout epilogue's mask.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    lda: u32, ldb: u32, ldc: u32, inner: u32,
    offset_a: u32, offset_b: u32, offset_c: u32, epilogue: u32,
    stride_a: u32, stride_b: u32, stride_c: u32, pad2: u32,
    inner_stride_a: u32, inner_stride_b: u32, inner_stride_c: u32, pad3: u32,
    drop_seed: u32, drop_stream: u32, drop_threshold: u32, drop_scale: f32,
    drop_first_index: u32, pad4: u32, pad5: u32, pad6: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Batch z is (outer, inner) = (z / inner, z % inner): each operand's start.
fn batch_base(z: u32, offset: u32, stride: u32, inner_stride: u32) -> u32 {
    return offset + (z / p.inner) * stride + (z % p.inner) * inner_stride;
}
