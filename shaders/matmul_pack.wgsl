// Repacks a matmul's B for matmul_subgroup.wgsl: packed[z][k][n] = op(B[z])[k][n] as f32,
// rows of ldp = N rounded up to 4 (the columns past N zero), batches one after another.
// Transposed B (TRANS_B: stored [N, K]) and B at any alignment become what that kernel's
// vec4 loads need. B's addressing (ldb, offset_b, batch strides) is that of the product, in
// matmul_params.wgsl's block.
//
// Entry point `matmul_pack`; bindings 0 params, 1 B (read, B_ELEMENT), 2 the packed B (written,
// vec4s of f32). Each invocation writes whole vec4s of a packed row:
//   BLOCKS false: one vec4, packed[z][k][4q .. 4q + 3], from four scalar loads of B;
//   BLOCKS true (TRANS_B, with K, ldb, offset_b and batch strides whole vec4s; B_ELEMENT
//   vec4<B_TYPE>): a 4 × 4 block, four vec4 loads along k of rows 4q .. 4q + 3 of the stored
//   B, transposed in registers into four vec4 stores — a quarter of the loads and stores
//   (llvmpipe makes each a scalar access per lane).
// Dispatch: ceil(vec4s / 64) workgroups of 64 (vec4s: batch · K · ldp / 4, or a quarter of
// that with BLOCKS), spread over x and y (gpu::spread).

@group(0) @binding(1) var<storage, read> b: array<B_ELEMENT>;
@group(0) @binding(2) var<storage, read_write> packed: array<vec4<f32>>;

// B's element (or vec4) at `index`, widened: the same text type-checks for either binding
// (a scalar becomes four copies); each variant reads only what it bound.
fn load_b4(index: u32) -> vec4<f32> {
    return vec4<f32>(vec4<B_TYPE>(b[index]));
}

// op(B[z])[k][n], zero past N.
fn load_b(base: u32, k: u32, n: u32) -> f32 {
    let at = select(base + k * p.ldb + n, base + n * p.ldb + k, TRANS_B);
    return select(0.0, load_b4(at).x, n < p.n);
}

@compute @workgroup_size(64, 1, 1)
fn matmul_pack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let quads = (p.n + 3u) / 4u;    // vec4s per packed row
    let e = (wid.x + wid.y * nwg.x) * 64u + lid;
    let rows_per_item = select(1u, 4u, BLOCKS);
    let k_items = p.k / rows_per_item;
    if (e >= p.batch * k_items * quads) { return; }
    let z = e / (k_items * quads);
    let k = (e / quads) % k_items * rows_per_item;
    let q = e % quads;
    let base = batch_base(z, p.offset_b, p.stride_b, p.inner_stride_b);
    let out = (z * p.k + k) * quads + q;
    if (BLOCKS) {
        // Rows 4q + j of the stored B (clamped; zeros past N), k .. k + 3 of each.
        var rows: array<vec4<f32>, 4>;
        for (var j = 0u; j < 4u; j++) {
            let n = 4u * q + j;
            let value = load_b4((base + min(n, p.n - 1u) * p.ldb + k) / 4u);
            rows[j] = select(vec4<f32>(0.0), value, n < p.n);
        }
        packed[out] = vec4<f32>(rows[0].x, rows[1].x, rows[2].x, rows[3].x);
        packed[out + quads] = vec4<f32>(rows[0].y, rows[1].y, rows[2].y, rows[3].y);
        packed[out + 2u * quads] = vec4<f32>(rows[0].z, rows[1].z, rows[2].z, rows[3].z);
        packed[out + 3u * quads] = vec4<f32>(rows[0].w, rows[1].w, rows[2].w, rows[3].w);
    } else {
        let n = 4u * q;
        packed[out] = vec4<f32>(load_b(base, k, n), load_b(base, k, n + 1u), load_b(base, k, n + 2u),
                                load_b(base, k, n + 3u));
    }
}
