// The row kernels of unfused attention, where the products Q·Kᵀ, P·V and their gradients
// run on the batched matmul and the score matrices live in a workspace (CPU adapters, where
// the fused kernel's per-row loops are slow: see kernels/attention.rs).
//
// Layouts (f32, row-major): scores, d_scores [R, S] for the R = C·H·S rows of a chunk of C
// sequences starting at global row row0 = first_sequence·H·S; row r of the chunk is query i
// of head (b, h) with bh = (row0 + r) / S, i = (row0 + r) % S, b = bh / H. mask [B, S]
// (additive, per key); lse, delta [B, H, S]. Dropout keeps P[i][j] with the shared RNG at
// index first_index + ((b·H + h)·S + i)·S + j, as the fused kernel and the reference do.
//
// attention_softmax:           scores ← P·keep/(1-p), P = softmax(scores·scale + mask);
//                              lse ← log Σ_j exp(scores·scale + mask)
//   bindings: 0 params, 1 mask (read), 2 scores (read-write), 3 lse (write)
//   dispatch: one invocation per row, ceil(R / WG) workgroups spread over x and y.
// attention_softmax_backward:  with P recomputed from the scores and lse,
//                              scores ← P·keep/(1-p)            (for dV = scoresᵀ·dO)
//                              d_scores ← scale·P·(d_scores·keep/(1-p) - delta)
//                              (d_scores holds dO·Vᵀ on entry; dQ = d_scores·K, dK = d_scoresᵀ·Q)
//   bindings: 0 params, 1 mask, 2 lse, 3 delta (read), 4 scores, 5 d_scores (read-write)
//   dispatch: one invocation per row, ceil(R / WG) workgroups spread over x and y.
// WG = 64. Every value is computed by one invocation in a fixed order: deterministic.

struct Params {
    seq: u32,
    heads: u32,
    rows: u32,        // R: rows of this chunk
    row0: u32,        // global index of the chunk's first row
    scale: f32,
    seed: u32,
    stream: u32,
    threshold: u32,   // dropout: drop when draw < threshold = p * 2^32; 0 disables
    drop_scale: f32,  // 1 / (1 - p)
    first_index: u32, // the mask index of element 0 (a rank's slice of the batch)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> mask: array<f32>;
@group(0) @binding(2) var<storage, read_write> scores: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
// The backward's table.
@group(0) @binding(2) var<storage, read> lse_in: array<f32>;
@group(0) @binding(3) var<storage, read> delta: array<f32>;
@group(0) @binding(4) var<storage, read_write> probs: array<f32>;
@group(0) @binding(5) var<storage, read_write> d_scores: array<f32>;

const NEG_BIG: f32 = -1.0e30;
const WG: u32 = 64u;

// keep / (1 - p) for column j of global row g: 0 or drop_scale, 1 without dropout.
fn dropout_factor(g: u32, j: u32) -> f32 {
    if (params.threshold == 0u) {
        return 1.0;
    }
    let index = params.first_index + g * params.seq + j;
    return select(0.0, params.drop_scale, rng_keep(params.seed, params.stream, index, params.threshold));
}

// One invocation per row, three passes over it: no barriers (lavapipe runs a workgroup's
// barriers as coroutine switches, which cost more than this kernel's arithmetic) and no
// per-element index division (CPUs divide vectors one lane at a time).
@compute @workgroup_size(WG)
fn attention_softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let r = (wid.x + wid.y * nwg.x) * WG + lid;
    if (r >= params.rows) { return; }
    let g = params.row0 + r;
    let at = r * params.seq;
    let mask_at = (g / params.seq / params.heads) * params.seq;
    var m = NEG_BIG;
    for (var j = 0u; j < params.seq; j++) {
        m = max(m, scores[at + j] * params.scale + mask[mask_at + j]);
    }
    var l = 0.0;
    for (var j = 0u; j < params.seq; j++) {
        l += exp(scores[at + j] * params.scale + mask[mask_at + j] - m);
    }
    for (var j = 0u; j < params.seq; j++) {
        let p = exp(scores[at + j] * params.scale + mask[mask_at + j] - m) / l;
        scores[at + j] = p * dropout_factor(g, j);
    }
    lse[g] = m + log(l);
}

@compute @workgroup_size(WG)
fn attention_softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let r = (wid.x + wid.y * nwg.x) * WG + lid;
    if (r >= params.rows) { return; }
    let g = params.row0 + r;
    let at = r * params.seq;
    let mask_at = (g / params.seq / params.heads) * params.seq;
    let row_lse = lse_in[g];
    let row_delta = delta[g];
    for (var j = 0u; j < params.seq; j++) {
        let p = exp(probs[at + j] * params.scale + mask[mask_at + j] - row_lse);
        let keep = dropout_factor(g, j);
        probs[at + j] = p * keep;
        d_scores[at + j] = params.scale * p * (d_scores[at + j] * keep - row_delta);
    }
}
