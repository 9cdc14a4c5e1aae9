//! BERT embeddings on the CPU, in f64: out[b, s] = word[ids] + pos[s] + types[type_ids].

/// The word [V, H], position [P, H] and token-type [T, H] tables, row-major.
#[derive(Clone, Copy)]
pub struct Tables<'a, T> {
    pub word: &'a [T],
    pub pos: &'a [T],
    pub types: &'a [T],
    pub hidden: usize,
}

/// out [B * S, H] in f64 for tables of f32 or f64.
pub fn forward_f64<T: Copy + Into<f64>>(
    ids: &[u32],
    type_ids: &[u32],
    seq: usize,
    t: &Tables<T>,
) -> Vec<f64> {
    let h = t.hidden;
    let mut out = Vec::with_capacity(ids.len() * h);
    for (r, (&id, &ty)) in ids.iter().zip(type_ids).enumerate() {
        let (id, ty, s) = (id as usize, ty as usize, r % seq);
        for c in 0..h {
            let w: f64 = t.word[id * h + c].into();
            let p: f64 = t.pos[s * h + c].into();
            let y: f64 = t.types[ty * h + c].into();
            out.push(w + p + y);
        }
    }
    out
}

/// out [B * S, H] for ids and type_ids [B, S] with S = `seq`.
pub fn embedding_forward(ids: &[u32], type_ids: &[u32], seq: usize, t: &Tables<f32>) -> Vec<f32> {
    forward_f64(ids, type_ids, seq, t).iter().map(|&v| v as f32).collect()
}

/// (dword [V, H], dpos [P, H], dtypes [T, H]) from d_out [B * S, H] in f64; `rows` = [V, P, T].
pub fn backward_f64(
    d_out: &[f64],
    ids: &[u32],
    type_ids: &[u32],
    seq: usize,
    hidden: usize,
    rows: [usize; 3],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut grads = rows.map(|r| vec![0.0f64; r * hidden]);
    for (r, dy) in d_out.chunks_exact(hidden.max(1)).enumerate() {
        let targets = [ids[r] as usize, r % seq, type_ids[r] as usize];
        for (grad, target) in grads.iter_mut().zip(targets) {
            for (g, &d) in grad[target * hidden..][..hidden].iter_mut().zip(dy) {
                *g += d;
            }
        }
    }
    let [word, pos, types] = grads;
    (word, pos, types)
}

/// (dword [V, H], dpos [P, H], dtypes [T, H]) from d_out [B * S, H]; `rows` = [V, P, T].
pub fn embedding_backward(
    d_out: &[f32],
    ids: &[u32],
    type_ids: &[u32],
    seq: usize,
    hidden: usize,
    rows: [usize; 3],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d_out: Vec<f64> = d_out.iter().map(|&v| v as f64).collect();
    let narrow = |g: Vec<f64>| g.iter().map(|&v| v as f32).collect();
    let (word, pos, types) = backward_f64(&d_out, ids, type_ids, seq, hidden, rows);
    (narrow(word), narrow(pos), narrow(types))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{finite_difference, random_vec};

    #[test]
    fn backward_matches_finite_differences() {
        let (hidden, seq) = (3, 4);
        let ids = [2u32, 0, 2, 2, 1, 0, 0, 0];
        let type_ids = [0u32, 0, 1, 1, 0, 0, 0, 0];
        let rows = [3, 5, 2];
        let [word, pos, types] = [1u32, 2, 3].map(|seed| {
            let len = rows[seed as usize - 1] * hidden;
            random_vec(len, seed, 1.0).iter().map(|&v| v as f64).collect::<Vec<f64>>()
        });
        let w: Vec<f64> = random_vec(ids.len() * hidden, 9, 1.0).iter().map(|&v| v as f64).collect();
        let loss = |t: &Tables<f64>| -> f64 {
            let out = forward_f64(&ids, &type_ids, seq, t);
            out.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let d_out: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let (dword, dpos, dtypes) = embedding_backward(&d_out, &ids, &type_ids, seq, hidden, rows);
        let tables =
            |word: &[f64], pos: &[f64], types: &[f64]| -> f64 { loss(&Tables { word, pos, types, hidden }) };
        for (i, &want) in dword.iter().enumerate() {
            let fd = finite_difference(&word, i, 1e-3, &|v| tables(v, &pos, &types));
            assert!((fd - want as f64).abs() < 1e-6, "dword[{i}] {want} vs {fd}");
        }
        for (i, &want) in dpos.iter().enumerate() {
            let fd = finite_difference(&pos, i, 1e-3, &|v| tables(&word, v, &types));
            assert!((fd - want as f64).abs() < 1e-6, "dpos[{i}] {want} vs {fd}");
        }
        for (i, &want) in dtypes.iter().enumerate() {
            let fd = finite_difference(&types, i, 1e-3, &|v| tables(&word, &pos, v));
            assert!((fd - want as f64).abs() < 1e-6, "dtypes[{i}] {want} vs {fd}");
        }
    }
}
