//! BERT embeddings on the GPU against the CPU reference, and the host's segment plan.
//! Tolerances: forward rtol 1e-6 / atol 1e-6 (three f32 adds); backward rtol 1e-5 and
//! atol 1e-6 per summed row (a gradient row sums up to B * S rows of d_out).

mod common;

use common::{assert_close, gpu};
use pals::kernels::embedding::{self, EmbeddingPlan, Embeddings, SegmentPlan};
use pals::reference::embedding::Tables;
use pals::reference::{self, random_vec};

/// One batch: sizes and ids.
struct Case {
    batch: usize,
    seq: usize,
    hidden: usize,
    /// [V, P, T]: vocabulary, positions, token types.
    rows: [usize; 3],
    ids: Vec<u32>,
    type_ids: Vec<u32>,
}

fn random_case(batch: usize, seq: usize, hidden: usize, rows: [usize; 3], seed: u32) -> Case {
    let draw = |n: usize, s: u32| -> Vec<u32> {
        random_vec(batch * seq, s, 1.0)
            .iter()
            .map(|&u| (((u + 1.0) / 2.0 * n as f32) as u32).min(n as u32 - 1))
            .collect()
    };
    Case { batch, seq, hidden, rows, ids: draw(rows[0], seed), type_ids: draw(rows[2], seed + 1) }
}

/// Mostly padding (id 0, type 0), one token repeated many times, then a few others.
fn repeated_case() -> Case {
    let (batch, seq) = (6, 40);
    let mut ids = vec![0u32; batch * seq];
    let mut type_ids = vec![0u32; batch * seq];
    for b in 0..batch {
        let used = 5 + 6 * b;
        for s in 0..used {
            ids[b * seq + s] = if s % 3 == 0 { 7 } else { 100 + s as u32 };
            type_ids[b * seq + s] = (s >= used / 2) as u32;
        }
    }
    Case { batch, seq, hidden: 300, rows: [200, 64, 2], ids, type_ids }
}

fn cases() -> Vec<Case> {
    vec![
        random_case(1, 1, 1, [1, 1, 1], 1),
        random_case(2, 7, 204, [50, 9, 2], 2),
        random_case(3, 33, 383, [1000, 40, 3], 3),
        random_case(1, 5, 769, [20, 5, 2], 4),
        repeated_case(),
    ]
}

struct Results {
    out: Vec<f32>,
    grads: [Vec<f32>; 3],
}

fn run(case: &Case, seed: u32) -> Results {
    let gpu = gpu();
    let (h, r) = (case.hidden, case.batch * case.seq);
    let [word_h, pos_h, types_h] = [0, 1, 2].map(|i| random_vec(case.rows[i] * h, seed + i as u32, 1.0));
    let d_out_h = random_vec(r * h, seed + 3, 1.0);
    let shape = [case.batch, case.seq];
    let ids = gpu.upload("ids", &shape, &case.ids).unwrap();
    let type_ids = gpu.upload("type_ids", &shape, &case.type_ids).unwrap();
    let word = gpu.upload("word", &[case.rows[0], h], &word_h).unwrap();
    let pos = gpu.upload("pos", &[case.rows[1], h], &pos_h).unwrap();
    let types = gpu.upload("types", &[case.rows[2], h], &types_h).unwrap();
    let out = gpu.zeros("out", &[r, h]).unwrap();
    let d_out = gpu.upload("d_out", &[r, h], &d_out_h).unwrap();
    // Gradients start as garbage: the backward must zero them.
    let [dword, dpos, dtypes] =
        [0, 1, 2].map(|i| gpu.upload("grad", &[case.rows[i], h], &vec![f32::NAN; case.rows[i] * h]).unwrap());
    let tables = Embeddings { word: &word, pos: &pos, types: &types };
    let grads = Embeddings { word: &dword, pos: &dpos, types: &dtypes };
    let plan = EmbeddingPlan::new(gpu, &case.ids, &case.type_ids, case.seq, &tables).unwrap();
    let mut rec = gpu.recorder();
    embedding::embedding_forward(&mut rec, &ids, &type_ids, &tables, &out).unwrap();
    embedding::embedding_backward(&mut rec, &d_out, &plan, &grads).unwrap();
    rec.submit().unwrap();

    let out = gpu.read::<f32>(&out).unwrap();
    let host = Tables { word: &word_h, pos: &pos_h, types: &types_h, hidden: h };
    let want = reference::embedding::embedding_forward(&case.ids, &case.type_ids, case.seq, &host);
    assert_close(&format!("embedding out {r}x{h}"), &out, &want, 1e-6, 1e-6);
    let (gw, gp, gt) =
        reference::embedding::embedding_backward(&d_out_h, &case.ids, &case.type_ids, case.seq, h, case.rows);
    let atol = 1e-6 * r as f32;
    let got = [&dword, &dpos, &dtypes].map(|t| gpu.read::<f32>(t).unwrap());
    for (name, g, w) in [("dword", &got[0], &gw), ("dpos", &got[1], &gp), ("dtypes", &got[2], &gt)] {
        assert_close(&format!("{name} {r}x{h}"), g, w, 1e-5, atol);
    }
    Results { out, grads: got }
}

#[test]
fn forward_and_backward_match_reference() {
    for case in cases() {
        run(&case, 10);
    }
}

#[test]
fn results_are_bit_identical_twice() {
    let case = repeated_case();
    let (a, b) = (run(&case, 20), run(&case, 20));
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.out), bits(&b.out));
    for (x, y) in a.grads.iter().zip(&b.grads) {
        assert_eq!(bits(x), bits(y));
    }
}

#[test]
fn segment_plan_groups_rows_by_id() {
    let plan = SegmentPlan::new(&[3, 0, 3, 1, 0, 3], 4).unwrap();
    assert_eq!(plan.ids, vec![0, 1, 3]);
    assert_eq!(plan.offsets, vec![0, 2, 3, 6]);
    assert_eq!(plan.rows, vec![1, 4, 3, 0, 2, 5]);
    let empty = SegmentPlan::new(&[], 4).unwrap();
    assert_eq!((empty.ids.len(), empty.offsets, empty.rows.len()), (0, vec![0], 0));
    let error = SegmentPlan::new(&[1, 4], 4).unwrap_err().to_string();
    assert!(error.contains("id 4 at row 1"), "{error}");
}

#[test]
fn mismatched_shapes_are_errors() {
    let gpu = gpu();
    let ids = gpu.upload("ids", &[2, 3], &[0u32; 6]).unwrap();
    let word = gpu.zeros("word", &[5, 8]).unwrap();
    let pos = gpu.zeros("pos", &[2, 8]).unwrap();
    let types = gpu.zeros("types", &[2, 7]).unwrap();
    let out = gpu.zeros("out", &[6, 8]).unwrap();
    let mut tables = Embeddings { word: &word, pos: &pos, types: &types };
    let mut rec = gpu.recorder();
    let error = embedding::embedding_forward(&mut rec, &ids, &ids, &tables, &out).unwrap_err().to_string();
    assert!(error.contains("'types'") && error.contains("[2, 7]"), "{error}");
    tables.types = &pos;
    // seq 3 needs 3 positions, the table has 2.
    let error = embedding::embedding_forward(&mut rec, &ids, &ids, &tables, &out).unwrap_err().to_string();
    assert!(error.contains("'pos'"), "{error}");
    let error = EmbeddingPlan::new(gpu, &[0; 6], &[0; 6], 3, &tables).err().unwrap().to_string();
    assert!(error.contains("id 2 at row 2"), "{error}");
}

/// GPU time for a BERT-base batch; run on a real GPU with `--ignored --nocapture`.
#[test]
#[ignore]
fn embedding_timing() {
    let gpu = gpu();
    let case = random_case(32, 128, 768, [30522, 512, 2], 40);
    let (h, r) = (case.hidden, case.batch * case.seq);
    let tables = case.rows.map(|v| gpu.zeros("table", &[v, h]).unwrap());
    let grads = case.rows.map(|v| gpu.zeros("grad", &[v, h]).unwrap());
    let [tables, grads] = [&tables, &grads].map(|t| Embeddings { word: &t[0], pos: &t[1], types: &t[2] });
    let shape = [case.batch, case.seq];
    let ids = gpu.upload("ids", &shape, &case.ids).unwrap();
    let type_ids = gpu.upload("type_ids", &shape, &case.type_ids).unwrap();
    let out = gpu.zeros("out", &[r, h]).unwrap();
    let plan = EmbeddingPlan::new(gpu, &case.ids, &case.type_ids, case.seq, &tables).unwrap();
    for _ in 0..3 {
        let mut rec = gpu.recorder();
        embedding::embedding_forward(&mut rec, &ids, &type_ids, &tables, &out).unwrap();
        embedding::embedding_backward(&mut rec, &out, &plan, &grads).unwrap();
        for t in rec.submit_timed().unwrap() {
            eprintln!("embedding {r}x{h}: {} {:.1} us", t.label, t.nanos / 1e3);
        }
    }
}
