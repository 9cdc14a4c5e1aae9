// Batched matrix multiply with optional transposes and a fused epilogue:
//   C[b] = op(A[b]) · op(B[b])  (+ bias)  (GELU)        or   C[b] += op(A[b]) · op(B[b])
// op(A) is M×K: A is stored [M, K] (row stride lda) or, with TRANS_A, [K, M].
// op(B) is K×N: B is stored [K, N] (row stride ldb) or, with TRANS_B, [N, K].
// C is [M, N] with row stride ldc. Each operand has an element offset and a batch stride.
//
// Entry point `matmul`; bindings: 0 params, 1 A (read), 2 B (read), 3 bias [N] (read; any
// buffer when unused), 4 C (write), 5 pre-activation [M, N] (write; GELU epilogue only —
// the backward needs it; any spare buffer otherwise).
// Dispatch: (ceil(N / BN), ceil(M / BM), batch); workgroup (BN / TN) × (BM / TM).
//
// Compile-time constants (prepended by the host, chosen per adapter by measurement):
//   BM, BN, BK  workgroup tile; TM, TN  register tile per invocation;
//   TRANS_A, TRANS_B; EPILOGUE: 0 plain, 1 bias, 2 bias + GELU, 3 accumulate into C.
// Tiles of A and B are staged through workgroup memory as vec4s; per 4 steps of k each
// invocation reads TM vec4s of A and TN vec4s of B and does TM·TN·4 multiply-adds as vec4
// FMAs. This register blocking is what makes it fast on GPUs and on lavapipe alike (where
// vec4 loads are far cheaper than scalar gathers). TN and BK are multiples of 4; the
// global loads are scalar and bounds-checked, so no shape or alignment is required.
// Accumulation is f32, in a fixed order.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    lda: u32, ldb: u32, ldc: u32, pad0: u32,
    offset_a: u32, offset_b: u32, offset_c: u32, pad1: u32,
    stride_a: u32, stride_b: u32, stride_c: u32, pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
@group(0) @binding(5) var<storage, read_write> pre: array<f32>;

const THREADS_X: u32 = BN / TN;
const THREADS: u32 = (BM / TM) * (BN / TN);
const VN: u32 = TN / 4u;         // vec4 columns per invocation
const BK4: u32 = BK / 4u;
const BN4: u32 = BN / 4u;
const A_LOADS: u32 = (BM * BK4 + THREADS - 1u) / THREADS;
const B_LOADS: u32 = (BK * BN4 + THREADS - 1u) / THREADS;

// Staged tiles hold vec4s so the inner loop does 4-wide loads and multiply-adds.
var<workgroup> tile_a: array<vec4<f32>, BM * BK4>;   // [BM][BK/4], 4 consecutive k per vec4
var<workgroup> tile_b: array<vec4<f32>, BK * BN4>;   // [BK][BN/4], 4 consecutive n per vec4

fn load_a(base: u32, row: u32, col_k: u32) -> f32 {
    if (row >= p.m || col_k >= p.k) { return 0.0; }
    if (TRANS_A) { return a[base + col_k * p.lda + row]; }
    return a[base + row * p.lda + col_k];
}

fn load_b(base: u32, row_k: u32, col: u32) -> f32 {
    if (row_k >= p.k || col >= p.n) { return 0.0; }
    if (TRANS_B) { return b[base + col * p.ldb + row_k]; }
    return b[base + row_k * p.ldb + col];
}

@compute @workgroup_size(THREADS_X, BM / TM, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) tid: u32) {
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let base_a = p.offset_a + wid.z * p.stride_a;
    let base_b = p.offset_b + wid.z * p.stride_b;

    var acc: array<array<vec4<f32>, VN>, TM>;
    var frag_b: array<array<vec4<f32>, VN>, 4>;

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Consecutive invocations walk the operand's contiguous axis in global memory.
        for (var l = 0u; l < A_LOADS; l++) {
            let e = tid + l * THREADS;
            if (e < BM * BK4) {
                var r: u32; var kq: u32;
                if (TRANS_A) { r = e % BM; kq = e / BM; } else { r = e / BK4; kq = e % BK4; }
                let kk = k0 + 4u * kq;
                tile_a[r * BK4 + kq] = vec4<f32>(load_a(base_a, row0 + r, kk), load_a(base_a, row0 + r, kk + 1u),
                                                 load_a(base_a, row0 + r, kk + 2u), load_a(base_a, row0 + r, kk + 3u));
            }
        }
        for (var l = 0u; l < B_LOADS; l++) {
            let e = tid + l * THREADS;
            if (e < BK * BN4) {
                var kk: u32; var nq: u32;
                if (TRANS_B) { kk = e % BK; nq = e / BK; } else { kk = e / BN4; nq = e % BN4; }
                let cc = col0 + 4u * nq;
                tile_b[kk * BN4 + nq] = vec4<f32>(load_b(base_b, k0 + kk, cc), load_b(base_b, k0 + kk, cc + 1u),
                                                  load_b(base_b, k0 + kk, cc + 2u), load_b(base_b, k0 + kk, cc + 3u));
            }
        }
        workgroupBarrier();
        for (var kq = 0u; kq < BK4; kq++) {
            // Invocation x owns vec4 columns x, x + THREADS_X, ...: neighbours read neighbours.
            for (var c = 0u; c < 4u; c++) {
                for (var v = 0u; v < VN; v++) {
                    frag_b[c][v] = tile_b[(4u * kq + c) * BN4 + lid.x + v * THREADS_X];
                }
            }
            for (var i = 0u; i < TM; i++) {
                let frag_a = tile_a[(lid.y * TM + i) * BK4 + kq];
                for (var v = 0u; v < VN; v++) {
                    var sum = acc[i][v];
                    sum = fma(vec4<f32>(frag_a.x), frag_b[0][v], sum);
                    sum = fma(vec4<f32>(frag_a.y), frag_b[1][v], sum);
                    sum = fma(vec4<f32>(frag_a.z), frag_b[2][v], sum);
                    sum = fma(vec4<f32>(frag_a.w), frag_b[3][v], sum);
                    acc[i][v] = sum;
                }
            }
        }
        workgroupBarrier();
    }

    let base_c = p.offset_c + wid.z * p.stride_c;
    for (var i = 0u; i < TM; i++) {
        let row = row0 + lid.y * TM + i;
        if (row >= p.m) { continue; }
        for (var v = 0u; v < VN; v++) {
            for (var j = 0u; j < 4u; j++) {
                let col = col0 + 4u * (lid.x + v * THREADS_X) + j;
                if (col >= p.n) { continue; }
                let index = base_c + row * p.ldc + col;
                var value = acc[i][v][j];
                if (EPILOGUE == 1u || EPILOGUE == 2u) { value += bias[col]; }
                if (EPILOGUE == 2u) {
                    pre[index] = value;
                    value = gelu(value);
                }
                if (EPILOGUE == 3u) { value += c[index]; }
                c[index] = value;
            }
        }
    }
}
