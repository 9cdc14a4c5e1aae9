// A fixed-order tree reduction over a workgroup of 256, shared by loss.wgsl and
// optimizer.wgsl (the host concatenates this file in front of theirs). Every invocation
// gets the result; the whole workgroup must call it.

const WG: u32 = 256u;

var<workgroup> partial: array<f32, WG>;

// Sum, or max when take_max.
fn workgroup_reduce(lid: u32, value: f32, take_max: bool) -> f32 {
    partial[lid] = value;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half = half >> 1u) {
        if (lid < half) {
            let a = partial[lid];
            let b = partial[lid + half];
            partial[lid] = select(a + b, max(a, b), take_max);
        }
        workgroupBarrier();
    }
    let result = partial[0];
    workgroupBarrier(); // the next call overwrites partial
    return result;
}

fn workgroup_sum(lid: u32, value: f32) -> f32 {
    return workgroup_reduce(lid, value, false);
}
