// Fused multi-head self-attention, flash-attention style: the S x S score matrix never
// reaches global memory. Forward keeps an online softmax over key tiles; the backward
// recomputes the probabilities from q, k and the saved row log-sum-exp.
//
// Layouts (row-major): q, k, v, o, dO, dq, dk, dv [B, S, H, D]; mask [B, S] (additive,
// per key); lse, delta [B, H, S]. q, k and v are QKV_TYPE (f32, or f16 under mixed
// precision), widened at each load; everything else is f32, and every sum, the softmax and
// the log-sum-exp are f32. P = softmax(q.k^T * scale + mask) per (b, h, query row);
// dropout keeps P[i][j] with the shared RNG at index first_index + ((b*H + h)*S + i)*S + j.
// `defines` set QKV_TYPE (an alias, after `enable f16;` when it is f16), HEAD_DIM (= D) and
// BLOCK_K (rows per shared tile, BLOCK_K * HEAD_DIM <= 2048 so that the two f32 tiles take
// at most 16 KiB of workgroup memory). The delta prepass binds no q, k or v: its QKV_TYPE
// is always f32.
//
// attention_forward:   o = (P * keep / (1 - p)) . v;  lse = log sum_j exp(scores)
//   bindings: 0 params, 1 q, 2 k, 3 v (QKV_TYPE), 4 mask (read), 5 o, 6 lse (write)
// attention_delta:     delta[b, h, i] = sum_d dO[b, i, h, d] * o[b, i, h, d]
//   bindings: 0 params, 1 o, 2 dO (read), 3 delta (write)
// attention_backward_dq:   dq = scale * dS . k,    dS = P * (dP - delta), dP = dO.v^T * keep/(1-p)
//   bindings: 0 params, 1 q, 2 k, 3 v (QKV_TYPE), 4 mask, 5 dO, 6 lse, 7 delta (read), 8 dq (write)
// attention_backward_dkdv: dk = scale * dS^T . q,  dv = (P * keep / (1 - p))^T . dO
//   bindings: 0 params, 1 q, 2 k, 3 v (QKV_TYPE), 4 mask, 5 dO, 6 lse, 7 delta (read), 8 dk,
//   9 dv (write)
// Dispatch: forward, dq and dkdv run one workgroup of BLOCK_Q = 64 invocations per
// (b, h, block of 64 rows): one query row (forward, dq) or key row (dkdv) per invocation,
// B*H*ceil(S/64) workgroups spread over x and y (see gpu::spread). The delta prepass runs
// one [B, S, H] row per invocation, ceil(B*S*H / 256) workgroups of 256.
// Every output element is written by one invocation after a fixed-order loop: deterministic.

const BLOCK_Q: u32 = 64u;
const TILE: u32 = BLOCK_K * HEAD_DIM;
const NEG_BIG: f32 = -1.0e30;

struct Params {
    batch: u32,
    seq: u32,
    heads: u32,
    blocks: u32,      // ceil(seq / BLOCK_Q)
    scale: f32,       // applied to q.k before the mask
    seed: u32,
    stream: u32,
    threshold: u32,   // dropout: drop when draw < threshold = p * 2^32; 0 disables
    drop_scale: f32,  // 1 / (1 - p)
    first_index: u32, // the mask index of element 0 (a rank's slice of the batch)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<QKV_TYPE>;
@group(0) @binding(2) var<storage, read> k: array<QKV_TYPE>;
@group(0) @binding(3) var<storage, read> v: array<QKV_TYPE>;
@group(0) @binding(4) var<storage, read> mask: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<storage, read> d_out: array<f32>;
@group(0) @binding(6) var<storage, read> lse_in: array<f32>;
@group(0) @binding(7) var<storage, read> delta: array<f32>;
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;
@group(0) @binding(8) var<storage, read_write> dk: array<f32>;
@group(0) @binding(9) var<storage, read_write> dv: array<f32>;
// The delta prepass has its own, shorter binding table.
@group(0) @binding(1) var<storage, read> o_rows: array<f32>;
@group(0) @binding(2) var<storage, read> d_out_rows: array<f32>;
@group(0) @binding(3) var<storage, read_write> delta_out: array<f32>;

// Forward and dq: K and V rows of the current key tile. dkdv: Q and dO rows of the
// current query tile. [BLOCK_K, HEAD_DIM] each.
var<workgroup> tile_a: array<f32, TILE>;
var<workgroup> tile_b: array<f32, TILE>;

// Which (b, h) and which block of 64 rows a workgroup owns; `bh` past B*H means none
// (spread() may launch a few extra workgroups).
struct Block {
    bh: u32,
    b: u32,
    h: u32,
    row: u32,   // this invocation's query (forward, dq) or key (dkdv) row
}

fn block_of(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Block {
    let index = wid.x + wid.y * nwg.x;
    let bh = index / params.blocks;
    let row = (index % params.blocks) * BLOCK_Q + lid;
    return Block(bh, bh / params.heads, bh % params.heads, row);
}

// Offset of element 0 of row (b, s, h) in a [B, S, H, D] tensor.
fn row_offset(b: u32, s: u32, h: u32) -> u32 {
    return ((b * params.seq + s) * params.heads + h) * HEAD_DIM;
}

// keep / (1 - p) for query i, key j of head `bh`: 0 or drop_scale, 1 without dropout.
fn dropout_factor(bh: u32, i: u32, j: u32) -> f32 {
    if (params.threshold == 0u) {
        return 1.0;
    }
    let index = params.first_index + (bh * params.seq + i) * params.seq + j;
    return select(0.0, params.drop_scale, rng_keep(params.seed, params.stream, index, params.threshold));
}

// Consecutive invocations load consecutive elements of a row: coalesced. Rows past S are 0.
// The tiles are f32 whatever QKV_TYPE is: widened once here, not per use.
fn load_kv_tile(b: u32, h: u32, first: u32, lid: u32) {
    for (var e = lid; e < TILE; e += BLOCK_Q) {
        let s = first + e / HEAD_DIM;
        let at = row_offset(b, min(s, params.seq - 1u), h) + e % HEAD_DIM;
        tile_a[e] = select(0.0, f32(k[at]), s < params.seq);
        tile_b[e] = select(0.0, f32(v[at]), s < params.seq);
    }
}

fn load_qdo_tile(b: u32, h: u32, first: u32, lid: u32) {
    for (var e = lid; e < TILE; e += BLOCK_Q) {
        let s = first + e / HEAD_DIM;
        let at = row_offset(b, min(s, params.seq - 1u), h) + e % HEAD_DIM;
        tile_a[e] = select(0.0, f32(q[at]), s < params.seq);
        tile_b[e] = select(0.0, d_out[at], s < params.seq);
    }
}

fn dot_a(x: ptr<function, array<f32, HEAD_DIM>>, r: u32) -> f32 {
    var sum = 0.0;
    for (var d = 0u; d < HEAD_DIM; d++) {
        sum += (*x)[d] * tile_a[r * HEAD_DIM + d];
    }
    return sum;
}

fn dot_b(x: ptr<function, array<f32, HEAD_DIM>>, r: u32) -> f32 {
    var sum = 0.0;
    for (var d = 0u; d < HEAD_DIM; d++) {
        sum += (*x)[d] * tile_b[r * HEAD_DIM + d];
    }
    return sum;
}

@compute @workgroup_size(BLOCK_Q)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let blk = block_of(wid, nwg, lid);
    if (blk.bh >= params.batch * params.heads) { return; }
    let i = blk.row;
    let live = i < params.seq;
    // q pre-scaled so a score is one dot product plus the mask.
    var qs: array<f32, HEAD_DIM>;
    var acc: array<f32, HEAD_DIM>;
    if (live) {
        let at = row_offset(blk.b, i, blk.h);
        for (var d = 0u; d < HEAD_DIM; d++) { qs[d] = f32(q[at + d]) * params.scale; }
    }
    var scores: array<f32, BLOCK_K>;
    var m = NEG_BIG;   // running max of the scores
    var l = 0.0;       // running sum of exp(score - m), before dropout
    for (var first = 0u; first < params.seq; first += BLOCK_K) {
        workgroupBarrier();   // everyone is done with the previous tile
        load_kv_tile(blk.b, blk.h, first, lid);
        workgroupBarrier();
        let n = min(BLOCK_K, params.seq - first);
        var m_new = m;
        for (var j = 0u; j < n; j++) {
            scores[j] = dot_a(&qs, j) + mask[blk.b * params.seq + first + j];
            m_new = max(m_new, scores[j]);
        }
        // One rescale per tile instead of per key.
        let correction = exp(m - m_new);
        l *= correction;
        for (var d = 0u; d < HEAD_DIM; d++) { acc[d] *= correction; }
        for (var j = 0u; j < n; j++) {
            let p = exp(scores[j] - m_new);
            l += p;
            let w = p * dropout_factor(blk.bh, i, first + j);
            for (var d = 0u; d < HEAD_DIM; d++) { acc[d] += w * tile_b[j * HEAD_DIM + d]; }
        }
        m = m_new;
    }
    if (live) {
        let at = row_offset(blk.b, i, blk.h);
        for (var d = 0u; d < HEAD_DIM; d++) { o[at + d] = acc[d] / l; }
        lse[blk.bh * params.seq + i] = m + log(l);
    }
}

@compute @workgroup_size(256)
fn attention_delta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = (wid.x + wid.y * nwg.x) * 256u + lid;   // index into [B, S, H]
    if (row >= params.batch * params.seq * params.heads) { return; }
    var sum = 0.0;
    for (var d = 0u; d < HEAD_DIM; d++) {
        sum += d_out_rows[row * HEAD_DIM + d] * o_rows[row * HEAD_DIM + d];
    }
    let h = row % params.heads;
    let bs = row / params.heads;
    let b = bs / params.seq;
    delta_out[(b * params.heads + h) * params.seq + bs % params.seq] = sum;
}

@compute @workgroup_size(BLOCK_Q)
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let blk = block_of(wid, nwg, lid);
    if (blk.bh >= params.batch * params.heads) { return; }
    let i = blk.row;
    let live = i < params.seq;
    var qs: array<f32, HEAD_DIM>;
    var dor: array<f32, HEAD_DIM>;
    var acc: array<f32, HEAD_DIM>;
    var row_lse = 0.0;
    var row_delta = 0.0;
    if (live) {
        let at = row_offset(blk.b, i, blk.h);
        for (var d = 0u; d < HEAD_DIM; d++) {
            qs[d] = f32(q[at + d]) * params.scale;
            dor[d] = d_out[at + d];
        }
        row_lse = lse_in[blk.bh * params.seq + i];
        row_delta = delta[blk.bh * params.seq + i];
    }
    for (var first = 0u; first < params.seq; first += BLOCK_K) {
        workgroupBarrier();
        load_kv_tile(blk.b, blk.h, first, lid);
        workgroupBarrier();
        let n = min(BLOCK_K, params.seq - first);
        for (var j = 0u; j < n; j++) {
            let p = exp(dot_a(&qs, j) + mask[blk.b * params.seq + first + j] - row_lse);
            let dp = dot_b(&dor, j) * dropout_factor(blk.bh, i, first + j);
            let ds = p * (dp - row_delta);
            for (var d = 0u; d < HEAD_DIM; d++) { acc[d] += ds * tile_a[j * HEAD_DIM + d]; }
        }
    }
    if (live) {
        let at = row_offset(blk.b, i, blk.h);
        for (var d = 0u; d < HEAD_DIM; d++) { dq[at + d] = acc[d] * params.scale; }
    }
}

@compute @workgroup_size(BLOCK_Q)
fn attention_backward_dkdv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let blk = block_of(wid, nwg, lid);
    if (blk.bh >= params.batch * params.heads) { return; }
    let j = blk.row;
    let live = j < params.seq;
    var ks: array<f32, HEAD_DIM>;
    var vr: array<f32, HEAD_DIM>;
    var dk_acc: array<f32, HEAD_DIM>;
    var dv_acc: array<f32, HEAD_DIM>;
    var key_mask = 0.0;
    if (live) {
        let at = row_offset(blk.b, j, blk.h);
        for (var d = 0u; d < HEAD_DIM; d++) {
            ks[d] = f32(k[at + d]) * params.scale;
            vr[d] = f32(v[at + d]);
        }
        key_mask = mask[blk.b * params.seq + j];
    }
    for (var first = 0u; first < params.seq; first += BLOCK_K) {
        workgroupBarrier();
        load_qdo_tile(blk.b, blk.h, first, lid);
        workgroupBarrier();
        let n = min(BLOCK_K, params.seq - first);
        for (var r = 0u; r < n; r++) {
            let i = first + r;
            let p = exp(dot_a(&ks, r) + key_mask - lse_in[blk.bh * params.seq + i]);
            let keep = dropout_factor(blk.bh, i, j);
            let ds = p * (dot_b(&vr, r) * keep - delta[blk.bh * params.seq + i]);
            let pk = p * keep;
            for (var d = 0u; d < HEAD_DIM; d++) {
                dv_acc[d] += pk * tile_b[r * HEAD_DIM + d];
                dk_acc[d] += ds * tile_a[r * HEAD_DIM + d];
            }
        }
    }
    if (live) {
        let at = row_offset(blk.b, j, blk.h);
        for (var d = 0u; d < HEAD_DIM; d++) {
            dk[at + d] = dk_acc[d] * params.scale;
            dv[at + d] = dv_acc[d];
        }
    }
}
