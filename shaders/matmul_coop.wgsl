// Batched matrix multiply on cooperative matrices (tensor cores), the same product,
// transposes, strides and epilogues as matmul.wgsl:
//   C[b] = op(A[b]) · op(B[b])  (+ bias)  (GELU)        or   C[b] += op(A[b]) · op(B[b])
// Operands are rounded to f16 when staged; products accumulate in f32 on 16×16×16
// cooperative matrices (f16 × f16 → f32, the configuration NVIDIA and AMD report).
// Only used where the adapter has EXPERIMENTAL_COOPERATIVE_MATRIX with that configuration
// and a fixed subgroup size; the host prepends `enable f16; enable wgpu_cooperative_matrix;`
// and the constants below.
//
// Entry point `matmul_coop`; parameters, bindings, storage types (A_TYPE, B_TYPE, C_TYPE:
// f32 or f16, as matmul.wgsl) and epilogue in matmul_io.wgsl.
// Dispatch: (ceil(N / 32), ceil(M / 32), batch); workgroup = one subgroup of SUBGROUP
// invocations, which owns a 32 × 32 block of C as 2 × 2 accumulator matrices.
//
// Compile-time constants: SUBGROUP (the adapter's subgroup size), TRANS_A, TRANS_B.
// Every K-tile of A [32 × 32] and B [32 × 32] is staged row-major in workgroup memory with
// zeros past the edges, so any shape works; the accumulators go back through workgroup
// memory to the bounds-checked epilogue. Accumulation order is fixed: deterministic.

const BM: u32 = 32u;
const BN: u32 = 32u;
const BK: u32 = 32u;

var<workgroup> tile_a: array<f16, BM * BK>;   // [BM][BK]
var<workgroup> tile_b: array<f16, BK * BN>;   // [BK][BN]
var<workgroup> tile_c: array<f32, BM * BN>;   // [BM][BN], the accumulators for the epilogue

fn load_a(base: u32, row: u32, col_k: u32) -> f32 {
    if (row >= p.m || col_k >= p.k) { return 0.0; }
    if (TRANS_A) { return f32(a[base + col_k * p.lda + row]); }
    return f32(a[base + row * p.lda + col_k]);
}

fn load_b(base: u32, row_k: u32, col: u32) -> f32 {
    if (row_k >= p.k || col >= p.n) { return 0.0; }
    if (TRANS_B) { return f32(b[base + col * p.ldb + row_k]); }
    return f32(b[base + row_k * p.ldb + col]);
}

@compute @workgroup_size(SUBGROUP, 1, 1)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let base_a = batch_base(wid.z, p.offset_a, p.stride_a, p.inner_stride_a);
    let base_b = batch_base(wid.z, p.offset_b, p.stride_b, p.inner_stride_b);
    var acc00 = coop_mat16x16<f32, C>();
    var acc01 = coop_mat16x16<f32, C>();
    var acc10 = coop_mat16x16<f32, C>();
    var acc11 = coop_mat16x16<f32, C>();
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var e = lane; e < BM * BK; e += SUBGROUP) {
            tile_a[e] = f16(load_a(base_a, row0 + e / BK, k0 + e % BK));
            tile_b[e] = f16(load_b(base_b, k0 + e / BN, col0 + e % BN));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[kk], BK);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&tile_a[16u * BK + kk], BK);
            let b0 = coopLoadT<coop_mat16x16<f16, B>>(&tile_b[kk * BN], BN);
            let b1 = coopLoadT<coop_mat16x16<f16, B>>(&tile_b[kk * BN + 16u], BN);
            acc00 = coopMultiplyAdd(a0, b0, acc00);
            acc01 = coopMultiplyAdd(a0, b1, acc01);
            acc10 = coopMultiplyAdd(a1, b0, acc10);
            acc11 = coopMultiplyAdd(a1, b1, acc11);
        }
        workgroupBarrier();
    }
    coopStoreT(acc00, &tile_c[0u], BN);
    coopStoreT(acc01, &tile_c[16u], BN);
    coopStoreT(acc10, &tile_c[16u * BN], BN);
    coopStoreT(acc11, &tile_c[16u * BN + 16u], BN);
    workgroupBarrier();

    let base_c = batch_base(wid.z, p.offset_c, p.stride_c, p.inner_stride_c);
    for (var e = lane; e < BM * BN; e += SUBGROUP) {
        let row = row0 + e / BN;
        let col = col0 + e % BN;
        if (row >= p.m || col >= p.n) { continue; }
        write_c(base_c + row * p.ldc + col, col, tile_c[e]);
    }
}
