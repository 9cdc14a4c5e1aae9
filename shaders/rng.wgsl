// Counter-based RNG shared by dropout and attention dropout: a PCG hash of
// (seed, stream, element index). The same function lives in src/reference/rng.rs;
// a backward pass regenerates a mask instead of storing it.

fn pcg_hash(input: u32) -> u32 {
    let state = input * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Uniform u32 for element `index` of stream `stream` (e.g. step * 64 + site) under `seed`.
fn rng_u32(seed: u32, stream: u32, index: u32) -> u32 {
    return pcg_hash(index ^ pcg_hash(stream ^ pcg_hash(seed)));
}

// Dropout keeps an element when its draw is at or above the threshold p * 2^32.
fn rng_keep(seed: u32, stream: u32, index: u32, threshold: u32) -> bool {
    return rng_u32(seed, stream, index) >= threshold;
}
