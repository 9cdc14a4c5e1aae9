// What every matmul kernel shares (matmul.wgsl, matmul_coop.wgsl): the parameter block,
// the bindings, batch addressing and the epilogue that writes C.
//
// Bindings: 0 params, 1 A (read), 2 B (read), 3 bias [N] (read; any buffer when unused),
// 4 C (write), 5 pre-activation [M, N] (written by the GELU epilogue — the backward needs
// it; read by the GELU-backward epilogue; any spare buffer otherwise). A_TYPE, B_TYPE and
// C_TYPE (f32 or f16) are aliases the host prepends; bias is f32 and every sum is f32.
// A_ELEMENT and B_ELEMENT, A's and B's elements as bound, are A_TYPE and B_TYPE, or vec4s
// of them where matmul_subgroup.wgsl loads four values at once.
//
// The epilogue is a parameter, not a compile-time constant: one pipeline serves every
// epilogue of a tile and transpose form, which on lavapipe (seconds per compile) is most
// of a first run's pipeline builds. It is uniform, and runs once per output element.
//   epilogue: 0 plain, 1 bias, 2 bias + GELU, 3 accumulate into C, 4 bias + dropout (the
//   mask of elementwise.wgsl's dropout over C: element index - offset_c, rng.wgsl),
//   5 GELU backward (C = product · GELU'(pre), elementwise.wgsl's gelu_backward of the
//   product: the gradient of a GELU's input from that of its output).

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
@group(0) @binding(1) var<storage, read> a: array<A_ELEMENT>;
@group(0) @binding(2) var<storage, read> b: array<B_ELEMENT>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<C_TYPE>;
@group(0) @binding(5) var<storage, read_write> pre: array<C_TYPE>;

// Batch z is (outer, inner) = (z / inner, z % inner): each operand's start.
fn batch_base(z: u32, offset: u32, stride: u32, inner_stride: u32) -> u32 {
    return offset + (z / p.inner) * stride + (z % p.inner) * inner_stride;
}

// Writes one element of C (at `index`, in column `col`) through the epilogue.
fn write_c(index: u32, col: u32, product: f32) {
    var value = product;
    if (p.epilogue == 1u || p.epilogue == 2u || p.epilogue == 4u) { value += bias[col]; }
    if (p.epilogue == 4u) {
        let keep = rng_keep(p.drop_seed, p.drop_stream, p.drop_first_index + index - p.offset_c, p.drop_threshold);
        value = select(0.0, value * p.drop_scale, keep);
    }
    if (p.epilogue == 2u) {
        pre[index] = C_TYPE(value);
        value = gelu(value);
    }
    if (p.epilogue == 3u) { value += f32(c[index]); }
    if (p.epilogue == 5u) { value *= gelu_grad(f32(pre[index])); }
    c[index] = C_TYPE(value);
}
