// Losses over a batch of B examples with per-example weights w_b (0 masks a padding example).
// N = max(sum_b w_b, 1): the loss is the mean over real examples, and an all-masked batch
// gives loss 0 and zero gradients. Gradients are also multiplied by grad_scale[0] (the loss
// scale of mixed precision, which the optimizer changes on the GPU).
// Every sum runs in a fixed order (per-thread strided loops, then a tree), so results are
// bit-identical from run to run.
//
// cross_entropy_loss:     loss[0] = sum_b w_b * CE_b / N
//                         CE_b = logsumexp(logits[b, :]) - logits[b, label_b]
//   bindings: 0 params, 1 logits [B, C] (read), 2 labels u32 [B] (read), 3 weights [B] (read),
//             4 loss [1] (write)
//   dispatch: 1 workgroup of 256; thread t takes rows t, t + 256, ...
// cross_entropy_backward: dlogits[b, c] = grad_scale * w_b * (softmax(logits[b, :])[c] - [c == label_b]) / N
//   bindings: 0 params, 1 logits [B, C], 2 labels [B], 3 weights [B] (read), 4 dlogits [B, C] (write),
//             5 grad_scale [1] (read)
//   dispatch: B workgroups of 256 spread over x/y (gpu::spread), one row each; each workgroup
//             recomputes N itself, in the same order, rather than needing a scratch buffer.
// mse:                    loss[0] = sum_b w_b (p_b - t_b)^2 / N,  dpred[b] = grad_scale * 2 w_b (p_b - t_b) / N
//   bindings: 0 params, 1 pred [B] (read), 2 targets [B] (read), 3 weights [B] (read),
//             4 loss [1] (write), 5 dpred [B] (write), 6 grad_scale [1] (read)
//   dispatch: 1 workgroup of 256; O(B) work, B is a batch size.
//
// An example whose label is >= C counts as masked rather than reading outside its row.
// Masked examples contribute exact zeros even if their logits are not finite.

struct Params {
    batch: u32,
    classes: u32,
}

const LOWEST: f32 = -3.402823e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> pred: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read> targets: array<f32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(5) var<storage, read_write> dpred: array<f32>;
@group(0) @binding(5) var<storage, read> ce_grad_scale: array<f32>;
@group(0) @binding(6) var<storage, read> mse_grad_scale: array<f32>;

fn ce_weight(b: u32) -> f32 {
    return select(0.0, weights[b], labels[b] < params.classes);
}

// N for cross-entropy, summed over rows t, t + 256, ... then the tree.
fn ce_normalizer(lid: u32) -> f32 {
    var sum = 0.0;
    for (var b = lid; b < params.batch; b += WG) {
        sum += ce_weight(b);
    }
    return max(workgroup_reduce(lid, sum, false), 1.0);
}

// CE of one row by one thread: C is small (a few classes) in the loss pass.
fn row_cross_entropy(b: u32) -> f32 {
    let base = b * params.classes;
    var row_max = LOWEST;
    for (var c = 0u; c < params.classes; c++) {
        row_max = max(row_max, logits[base + c]);
    }
    var sum = 0.0;
    for (var c = 0u; c < params.classes; c++) {
        sum += exp(logits[base + c] - row_max);
    }
    return log(sum) - (logits[base + labels[b]] - row_max);
}

@compute @workgroup_size(256)
fn cross_entropy_loss(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    for (var b = lid; b < params.batch; b += WG) {
        let w = ce_weight(b);
        if (w != 0.0) {
            sum += w * row_cross_entropy(b);
        }
    }
    let total = workgroup_reduce(lid, sum, false);
    let n = ce_normalizer(lid);
    if (lid == 0u) {
        loss[0] = total / n;
    }
}

@compute @workgroup_size(256)
fn cross_entropy_backward(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= params.batch) {
        return; // workgroup-uniform, so no barrier is skipped by part of a workgroup
    }
    let base = row * params.classes;
    var local_max = LOWEST;
    for (var c = lid; c < params.classes; c += WG) {
        local_max = max(local_max, logits[base + c]);
    }
    let row_max = workgroup_reduce(lid, local_max, true);
    var local_sum = 0.0;
    for (var c = lid; c < params.classes; c += WG) {
        local_sum += exp(logits[base + c] - row_max);
    }
    let inv_sum = 1.0 / workgroup_reduce(lid, local_sum, false);
    let w = ce_weight(row);
    let scale = ce_grad_scale[0] * w / ce_normalizer(lid);
    let label = labels[row];
    for (var c = lid; c < params.classes; c += WG) {
        let p = exp(logits[base + c] - row_max) * inv_sum;
        let g = scale * (p - select(0.0, 1.0, c == label));
        dlogits[base + c] = select(0.0, g, w != 0.0);
    }
}

@compute @workgroup_size(256)
fn mse(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    var weight = 0.0;
    for (var b = lid; b < params.batch; b += WG) {
        let w = weights[b];
        let d = pred[b] - targets[b];
        sum += select(0.0, w * d * d, w != 0.0);
        weight += w;
    }
    let total = workgroup_reduce(lid, sum, false);
    let n = max(workgroup_reduce(lid, weight, false), 1.0);
    if (lid == 0u) {
        loss[0] = total / n;
    }
    for (var b = lid; b < params.batch; b += WG) {
        let w = weights[b];
        let d = pred[b] - targets[b];
        dpred[b] = select(0.0, mse_grad_scale[0] * 2.0 * w * d / n, w != 0.0);
    }
}
