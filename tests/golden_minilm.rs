//! Parity with PyTorch + transformers on a real checkpoint (all-MiniLM-L6-v2): token ids,
//! last hidden state, pooled output, gradients of a fixed loss, and sentence-embedding
//! cosines, against tests/golden/minilm.json (made by tests/golden/minilm_golden.py).
//! Runs when PALS_MODEL_DIR points to the model (scripts/fetch-minilm.sh; CI sets it).

mod common;

use std::path::PathBuf;

use common::gpu;
use pals::data::Tokenizer;
use pals::encode::{Encoder, Pooling, cosine};
use pals::model::bert::{BatchInputs, Bert};
use pals::model::{EncoderBatch, load};
use serde_json::Value;

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PALS_MODEL_DIR").map(PathBuf::from);
    if dir.is_none() {
        eprintln!("PALS_MODEL_DIR not set: PyTorch parity test did not run (see scripts/fetch-minilm.sh)");
    }
    dir
}

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/minilm.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(f32s).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers: {v}"),
    }
}

/// The batch the golden script ran: every text padded to the longest.
fn golden_batch(g: &Value) -> EncoderBatch {
    let ids: Vec<Vec<u32>> = g["ids"].as_array().unwrap().iter().map(u32s).collect();
    let types: Vec<Vec<u32>> = g["type_ids"].as_array().unwrap().iter().map(u32s).collect();
    let seq = g["seq"].as_u64().unwrap() as usize;
    let pad = |rows: &[Vec<u32>]| -> Vec<u32> {
        rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(seq)).collect()
    };
    let mask = ids.iter().flat_map(|r| (0..seq).map(move |s| if s < r.len() { 1.0 } else { 0.0 })).collect();
    EncoderBatch { batch: ids.len(), seq, ids: pad(&ids), type_ids: pad(&types), mask }
}

/// Fails unless every |got − want| ≤ tol · max|want| over the slice.
fn assert_relative(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: got {g} want {w} (scale {scale})");
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(dir) = model_dir() else { return };
    let g = golden();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    for (text, want) in g["texts"].as_array().unwrap().iter().zip(g["ids"].as_array().unwrap()) {
        let (a, b) = (text[0].as_str().unwrap(), text[1].as_str());
        let got = tokenizer.encode_pair(a, b, 128).unwrap();
        assert_eq!(got.ids, u32s(want), "ids of {text}");
    }
}

#[test]
fn hidden_states_pooled_and_gradients_match_pytorch() {
    let Some(dir) = model_dir() else { return };
    let gpu = gpu();
    let g = golden();
    let (config, weights) = load::load_model_dir(&dir).unwrap();
    let bert = Bert::upload(gpu, &config, &weights).unwrap();
    let batch = golden_batch(&g);
    let (b, s, h) = (batch.batch, batch.seq, config.hidden_size);
    let stride = g["stride"].as_u64().unwrap() as usize;
    let acts = bert.activations(gpu, b, s).unwrap();
    let inputs = BatchInputs::upload(gpu, &config, &batch).unwrap();
    // The fixed loss of the golden script: L = Σ hidden·R1·mask + Σ pooled·R2.
    let r1: Vec<f32> = (0..b * s * h)
        .map(|i| {
            let (bi, si, hi) = (i / (s * h), i / h % s, i % h);
            let value = (0.37 * (bi * 1000 + si * 50 + hi) as f64 + 0.1).sin() as f32;
            value * batch.mask[bi * s + si]
        })
        .collect();
    let r2: Vec<f32> = (0..b * h).map(|i| (0.11 * ((i / h) * 100 + i % h) as f64).cos() as f32).collect();
    let d_seq = gpu.upload("d_seq", &[b * s, h], &r1).unwrap();
    let d_pooled = gpu.upload("d_pooled", &[b, h], &r2).unwrap();
    let mut rec = gpu.recorder();
    bert.forward(&mut rec, &acts, &inputs, None).unwrap();
    bert.backward(&mut rec, &acts, &inputs, &d_seq, &d_pooled, None).unwrap();
    rec.submit().unwrap();

    // Forward: within 1e-4 absolute, every real token, every `stride`-th feature.
    let hidden: Vec<f32> = gpu.read(acts.hidden.last().unwrap()).unwrap();
    for (bi, rows) in g["hidden"].as_array().unwrap().iter().enumerate() {
        for (si, row) in rows.as_array().unwrap().iter().enumerate() {
            let want = f32s(row);
            let got: Vec<f32> = (0..h).step_by(stride).map(|hi| hidden[(bi * s + si) * h + hi]).collect();
            for (j, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!((x - y).abs() <= 1e-4, "hidden[{bi}, {si}, {}]: got {x} want {y}", j * stride);
            }
        }
    }
    let pooled: Vec<f32> = gpu.read(&acts.pooled).unwrap();
    let got: Vec<f32> = (0..b)
        .flat_map(|bi| (0..h).step_by(stride).map(move |hi| (bi, hi)))
        .map(|(bi, hi)| pooled[bi * h + hi])
        .collect();
    let want = f32s(&g["pooled"]);
    for (i, (x, y)) in got.iter().zip(&want).enumerate() {
        assert!((x - y).abs() <= 1e-4, "pooled[{i}]: got {x} want {y}");
    }

    // Backward: slices of a few parameters' gradients, within 1e-3 of each slice's scale.
    let grads = bert.download_grads(gpu).unwrap();
    for (name, record) in g["grads"].as_object().unwrap() {
        let grad = &grads[name];
        let cols = *grad.shape.last().unwrap();
        let want = f32s(&record["values"]);
        let got: Vec<f32> = if let Some(rows) = record.get("rows") {
            u32s(rows)
                .iter()
                .flat_map(|&r| (0..cols).step_by(stride).map(move |c| r as usize * cols + c))
                .map(|i| grad.data[i])
                .collect()
        } else {
            let index: Vec<Vec<usize>> = record["index"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap_or(1) as usize).collect())
                .collect();
            let range = |r: &Vec<usize>| (r[0]..r[1]).step_by(r[2].max(1));
            if index.len() == 1 {
                range(&index[0]).map(|c| grad.data[c]).collect()
            } else {
                range(&index[0])
                    .flat_map(|r| range(&index[1]).map(move |c| r * cols + c))
                    .map(|i| grad.data[i])
                    .collect()
            }
        };
        assert_relative(&format!("gradient of {name}"), &got, &want, 1e-3);
    }
}

#[test]
fn sentence_embedding_cosines_match_pytorch() {
    let Some(dir) = model_dir() else { return };
    let g = golden();
    let texts: Vec<String> =
        g["texts"].as_array().unwrap().iter().take(6).map(|t| t[0].as_str().unwrap().to_string()).collect();
    let mut encoder = Encoder::from_dir(gpu(), &dir).unwrap();
    let embeddings = encoder.encode(&texts, Pooling::Mean, 4, 128).unwrap();
    for pair in g["cosines"].as_array().unwrap() {
        let (i, j, want) = (
            pair[0].as_u64().unwrap() as usize,
            pair[1].as_u64().unwrap() as usize,
            pair[2].as_f64().unwrap(),
        );
        let got = cosine(&embeddings[i], &embeddings[j]);
        assert!((got - want).abs() < 1e-4, "cosine({i}, {j}): got {got} want {want}");
    }
}
