// Repacks a matmul's B for matmul_subgroup.wgsl: packed[z][k][n] = op(B[z])[k][n] as f32,
// rows of ldp = N rounded up to 4 (the columns past N zero), batches one after another.
// Transposed B (TRANS_B: stored [N, K]) and B at any alignment become what that kernel's
// vec4 loads need. B's addressing (ldb, offset_b, batch strides) is that of the product, in
// matmul_io.wgsl's parameters.
//
// Entry point `matmul_pack`; bindings as matmul_io.wgsl (1 A and 3 bias unused, 2 B read,
// 4 the packed B written as C_TYPE = f32, 5 unused).
// Dispatch: ceil(batch · K · ldp / 64) workgroups of 64, spread over x and y (gpu::spread).

@compute @workgroup_size(64, 1, 1)
fn matmul_pack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let ldp = (p.n + 3u) / 4u * 4u;
    let e = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (e >= p.batch * p.k * ldp) { return; }
    let z = e / (p.k * ldp);
    let k = (e / ldp) % p.k;
    let n = e % ldp;
    var value = 0.0;
    if (n < p.n) {
        let base = batch_base(z, p.offset_b, p.stride_b, p.inner_stride_b);
        if (TRANS_B) { value = f32(b[base + n * p.ldb + k]); } else { value = f32(b[base + k * p.ldb + n]); }
    }
    c[e] = C_TYPE(value);
}
