// What every matmul kernel shares (matmul.wgsl, matmul_coop.wgsl, matmul_subgroup.wgsl):
// the bindings and the epilogue that writes C (after matmul_params.wgsl).
//
// Bindings: 0 params (matmul_params.wgsl), 1 A (read), 2 B (read), 3 bias [N] (read; any
// buffer when unused), 4 C (write), 5 pre-activation [M, N] (written by the GELU epilogue —
// the backward needs it; read by the GELU-backward epilogue; any spare buffer otherwise). A_TYPE, B_TYPE and
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

@group(0) @binding(1) var<storage, read> a: array<A_ELEMENT>;
@group(0) @binding(2) var<storage, read> b: array<B_ELEMENT>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<C_TYPE>;
@group(0) @binding(5) var<storage, read_write> pre: array<C_TYPE>;

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
