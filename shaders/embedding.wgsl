// BERT embeddings: word + position + token type, and their backward as segment sums.
//
// embedding_forward: out[r, h] = word[ids[r], h] + pos[r % S, h] + types[type_ids[r], h]
//   for rows r = b * S + s of the batch.
//   bindings: 0 params, 1 ids [B, S] (u32), 2 type_ids [B, S] (u32), 3 word [V, H],
//   4 pos [P, H], 5 types [T, H] (read), 6 out [B * S, H] (read_write).
//   Dispatch: ceil(B * S * H / 256) workgroups of 256 (spread), one element each.
//   Ids are checked on the host (SegmentPlan); a bad id here reads an unspecified value
//   (WGSL bounds robustness), never outside the buffer.
// segment_sum: grad[seg_ids[k], h] = sum over j in [offsets[k], offsets[k + 1]) of
//   d_out[rows[j], h], rows in increasing order. Ids absent from the plan are untouched.
//   bindings: 0 params, 1 d_out [R, H], 2 seg_ids [K], 3 offsets [K + 1], 4 rows [R] (read;
//   the last three u32), 5 grad [V, H] (read_write).
//   Dispatch: K * ceil(H / 256) workgroups of 256 (spread): segment k, a strip of 256
//   columns. The host groups rows by id, so the gradient of a repeated token is a plain
//   sequential sum: deterministic, and no float atomics.
// zero_fill: zeros[i] = 0 for i < n. bindings: 0 params, 1 zeros (read_write).
//   Dispatch: ceil(n / 256) workgroups of 256 (spread).

struct Params {
    n: u32,        // forward: B * S * H; segment_sum: K; zero_fill: elements
    seq: u32,      // forward: S
    hidden: u32,   // H
    strips: u32,   // segment_sum: ceil(H / 256)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> type_ids: array<u32>;
@group(0) @binding(3) var<storage, read> word: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<f32>;
@group(0) @binding(5) var<storage, read> types: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> d_out: array<f32>;
@group(0) @binding(2) var<storage, read> seg_ids: array<u32>;
@group(0) @binding(3) var<storage, read> offsets: array<u32>;
@group(0) @binding(4) var<storage, read> rows: array<u32>;
@group(0) @binding(5) var<storage, read_write> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> zeros: array<f32>;

fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

@compute @workgroup_size(256)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= params.n) {
        return;
    }
    let h = params.hidden;
    let row = i / h;
    let col = i % h;
    let s = row % params.seq;
    out[i] = word[ids[row] * h + col] + pos[s * h + col] + types[type_ids[row] * h + col];
}

@compute @workgroup_size(256)
fn segment_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid, nwg);
    let k = g / params.strips;
    let col = (g % params.strips) * 256u + lid;
    let h = params.hidden;
    if (k >= params.n || col >= h) {
        return;
    }
    var sum = 0.0;
    for (var j = offsets[k]; j < offsets[k + 1u]; j++) {
        sum += d_out[rows[j] * h + col];
    }
    grad[seg_ids[k] * h + col] = sum;
}

@compute @workgroup_size(256)
fn zero_fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i < params.n) {
        zeros[i] = 0.0;
    }
}
