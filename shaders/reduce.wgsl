// Column sum, deterministic: out[c, n] (= or +=) sum over rows m of chunk c of x[offset + m * N + n].
//
// colsum: bindings 0 params, 1 x (read) [M, N] starting at element `offset`,
//         2 out (read_write) [chunks, N], chunks = ceil(M / CHUNK_ROWS) (at least 1).
// Dispatch: (ceil(N / 64), chunks) workgroups of 64 x 4 = 256 invocations. Workgroup (i, c)
// covers columns [64 i, 64 i + 64) and rows [c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS); its
// 4 row lanes each sum every 4th row, then lane sums are added in a fixed order.
// The host calls it again on the [chunks, N] partials until one row is left, so the
// summation order depends only on (M, N): same inputs give bit-identical sums.
// Each row of 64 columns is one 256-byte coalesced load per lane.
// X_TYPE (alias prepended by the host) is x's storage, f32 or f16 (mixed precision's FFN
// gradients); the sums and `out` are f32.

const CHUNK_ROWS: u32 = 256u;

struct Params {
    m: u32,
    n: u32,
    offset: u32,
    accumulate: u32,  // 1: out += sum (only for the last pass), 0: out = sum
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<X_TYPE>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> lane_sums: array<f32, 256>;

@compute @workgroup_size(64, 4)
fn colsum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col = wid.x * 64u + lid.x;
    let row_end = min((wid.y + 1u) * CHUNK_ROWS, params.m);
    var sum = 0.0;
    if (col < params.n) {
        for (var row = wid.y * CHUNK_ROWS + lid.y; row < row_end; row += 4u) {
            sum += f32(x[params.offset + row * params.n + col]);
        }
    }
    lane_sums[lid.y * 64u + lid.x] = sum;
    workgroupBarrier();
    if (lid.y == 0u && col < params.n) {
        let total = (lane_sums[lid.x] + lane_sums[64u + lid.x])
            + (lane_sums[128u + lid.x] + lane_sums[192u + lid.x]);
        let i = wid.y * params.n + col;
        if (params.accumulate != 0u) {
            out[i] += total;
        } else {
            out[i] = total;
        }
    }
}
