//! The BERT encoder and pooler on the GPU against the CPU reference (reference::bert), forward
//! and backward, with and without dropout.
//! Tolerances: sequence and pooled outputs rtol 1e-4 / atol 1e-5; every parameter gradient
//! rtol 1e-3 / atol 1e-5 (the reference keeps activations in f64, the GPU in f32).

mod common;

use common::{assert_close, gpu};
use pals::error::ModelError;
use pals::gpu::{GpuError, Tensor};
use pals::kernels::attention::{self, AttentionPath, AttentionShape};
use pals::kernels::matmul;
use pals::model::bert::{Activations, BatchInputs, Bert};
use pals::model::memory::{MemoryPlan, tensor_bytes};
use pals::model::{BertConfig, DropoutKey, EncoderBatch, Weights, random_weights};
use pals::reference::{self, random_vec};

const OUT_RTOL: f32 = 1e-4;
const OUT_ATOL: f32 = 1e-5;
const GRAD_RTOL: f32 = 1e-3;
const GRAD_ATOL: f32 = 1e-5;

/// BERT's initialisation, with biases and LayerNorm parameters moved off 0 and 1 so that
/// each takes part.
fn weights(c: &BertConfig, seed: u32) -> Weights {
    let mut weights = random_weights(c, seed);
    for (index, (name, tensor)) in weights.iter_mut().enumerate() {
        if name.ends_with("bias") || name.contains("LayerNorm") {
            let noise = random_vec(tensor.data.len(), seed + 1000 + index as u32, 0.1);
            tensor.data.iter_mut().zip(noise).for_each(|(v, n)| *v += n);
        }
    }
    weights
}

/// `batch` sequences of length `seq`; sequence b has seq - 3b real tokens (at least 1), the
/// rest padding (id 0, mask 0); the second half of each sequence is token type 1.
fn encoder_batch(c: &BertConfig, batch: usize, seq: usize, seed: u32) -> EncoderBatch {
    let random = random_vec(batch * seq, seed, 1.0);
    let mut out = EncoderBatch { batch, seq, ids: vec![], type_ids: vec![], mask: vec![] };
    for b in 0..batch {
        let real = seq.saturating_sub(3 * b).max(1);
        for s in 0..seq {
            let r = random[b * seq + s].abs();
            let is_real = s < real;
            out.ids.push(if is_real {
                1 + (r * (c.vocab_size - 1) as f32) as u32 % (c.vocab_size as u32 - 1)
            } else {
                0
            });
            out.type_ids.push(u32::from(is_real && s >= real / 2));
            out.mask.push(if is_real { 1.0 } else { 0.0 });
        }
    }
    out
}

/// What one GPU step produces.
struct Step {
    seq: Vec<f32>,
    pooled: Vec<f32>,
    grads: Weights,
}

/// Uploads the model and batch, runs forward and backward in one submit and reads back.
fn gpu_step(
    c: &BertConfig,
    weights: &Weights,
    batch: &EncoderBatch,
    d_seq: &[f32],
    d_pooled: &[f32],
    dropout: Option<DropoutKey>,
) -> Step {
    let gpu = gpu();
    let bert = Bert::upload(gpu, c, weights).unwrap();
    let acts = bert.activations(gpu, batch.batch, batch.seq).unwrap();
    let inputs = BatchInputs::upload(gpu, c, batch).unwrap();
    let (rows, h) = (batch.batch * batch.seq, c.hidden_size);
    let d_seq = gpu.upload("d_seq", &[rows, h], d_seq).unwrap();
    let d_pooled = gpu.upload("d_pooled", &[batch.batch, h], d_pooled).unwrap();
    let mut rec = gpu.recorder();
    bert.forward(&mut rec, &acts, &inputs, dropout).unwrap();
    bert.backward(&mut rec, &acts, &inputs, &d_seq, &d_pooled, dropout).unwrap();
    rec.submit().unwrap();
    Step {
        seq: gpu.read(&acts.hidden[c.num_hidden_layers]).unwrap(),
        pooled: gpu.read(&acts.pooled).unwrap(),
        grads: bert.download_grads(gpu).unwrap(),
    }
}

/// GPU vs reference on one batch: outputs and every parameter gradient.
fn check(c: &BertConfig, batch: usize, seq: usize, dropout: Option<DropoutKey>, seed: u32) {
    let what = format!("{}x{} layers {} dropout {dropout:?}", batch, seq, c.num_hidden_layers);
    let weights = weights(c, seed);
    let batch = encoder_batch(c, batch, seq, seed + 1);
    let d_seq = random_vec(batch.batch * batch.seq * c.hidden_size, seed + 2, 1.0);
    let d_pooled = random_vec(batch.batch * c.hidden_size, seed + 3, 1.0);
    let (cache, want_seq, want_pooled) = reference::bert::forward(c, &weights, &batch, dropout);
    let want_grads = reference::bert::backward(c, &weights, &batch, &cache, &d_seq, &d_pooled);
    let got = gpu_step(c, &weights, &batch, &d_seq, &d_pooled, dropout);
    assert_close(&format!("{what}: sequence output"), &got.seq, &want_seq, OUT_RTOL, OUT_ATOL);
    assert_close(&format!("{what}: pooled"), &got.pooled, &want_pooled, OUT_RTOL, OUT_ATOL);
    assert_eq!(got.grads.keys().collect::<Vec<_>>(), want_grads.keys().collect::<Vec<_>>(), "{what}");
    for (name, want) in &want_grads {
        let grad = &got.grads[name];
        assert_eq!(grad.shape, want.shape, "{what}: {name}");
        assert_close(&format!("{what}: d {name}"), &grad.data, &want.data, GRAD_RTOL, GRAD_ATOL);
    }
}

fn tiny() -> BertConfig {
    BertConfig { hidden_dropout_prob: 0.2, attention_probs_dropout_prob: 0.2, ..BertConfig::tiny(2, 32, 4) }
}

const KEY: DropoutKey = DropoutKey::new(1234, 7);

#[test]
fn matches_reference_without_dropout() {
    check(&tiny(), 2, 7, None, 10);
    check(&tiny(), 3, 13, None, 20);
}

#[test]
fn matches_reference_with_dropout() {
    check(&tiny(), 2, 7, Some(KEY), 30);
    check(&tiny(), 3, 13, Some(DropoutKey::new(99, 0)), 40);
}

#[test]
fn one_token_one_layer_matches_reference() {
    check(&BertConfig::tiny(1, 8, 2), 1, 1, Some(KEY), 50);
}

/// head_dim 32 and hidden 384 as in MiniLM, one layer, a small vocabulary.
#[test]
fn minilm_dims_match_reference() {
    let c = BertConfig {
        num_hidden_layers: 1,
        vocab_size: 40,
        max_position_embeddings: 16,
        ..BertConfig::minilm()
    };
    assert_eq!(c.head_dim(), 32);
    check(&c, 2, 5, Some(KEY), 60);
}

#[test]
fn steps_are_deterministic() {
    let c = tiny();
    let weights = weights(&c, 70);
    let batch = encoder_batch(&c, 3, 13, 71);
    let d_seq = random_vec(3 * 13 * c.hidden_size, 72, 1.0);
    let d_pooled = random_vec(3 * c.hidden_size, 73, 1.0);
    let first = gpu_step(&c, &weights, &batch, &d_seq, &d_pooled, Some(KEY));
    let second = gpu_step(&c, &weights, &batch, &d_seq, &d_pooled, Some(KEY));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first.seq), bits(&second.seq));
    assert_eq!(bits(&first.pooled), bits(&second.pooled));
    for (name, grad) in &first.grads {
        assert_eq!(bits(&grad.data), bits(&second.grads[name].data), "{name}");
    }
}

/// The same buffers run two different batches in turn; the second step's results do not
/// depend on the first (gradients are overwritten, plans rewritten).
#[test]
fn buffers_are_reused_across_steps() {
    let gpu = gpu();
    let c = tiny();
    let weights = weights(&c, 80);
    let bert = Bert::upload(gpu, &c, &weights).unwrap();
    let acts = bert.activations(gpu, 2, 7).unwrap();
    let mut inputs = BatchInputs::new(gpu, &c, 2, 7).unwrap();
    let d_seq = gpu.upload("d_seq", &[14, c.hidden_size], &random_vec(14 * c.hidden_size, 81, 1.0)).unwrap();
    let d_pooled =
        gpu.upload("d_pooled", &[2, c.hidden_size], &random_vec(2 * c.hidden_size, 82, 1.0)).unwrap();
    let run = |inputs: &BatchInputs, key| {
        let mut rec = gpu.recorder();
        bert.forward(&mut rec, &acts, inputs, key).unwrap();
        bert.backward(&mut rec, &acts, inputs, &d_seq, &d_pooled, key).unwrap();
        rec.submit().unwrap();
        bert.download_grads(gpu).unwrap()
    };
    let second = encoder_batch(&c, 2, 7, 84);
    inputs.write(gpu, &encoder_batch(&c, 2, 7, 83)).unwrap();
    run(&inputs, Some(KEY));
    inputs.write(gpu, &second).unwrap();
    let reused = run(&inputs, None);
    let fresh =
        gpu_step(&c, &weights, &second, &gpu.read(&d_seq).unwrap(), &gpu.read(&d_pooled).unwrap(), None);
    for (name, grad) in &fresh.grads {
        assert_eq!(grad.data, reused[name].data, "{name}");
    }
}

#[test]
fn shape_errors() {
    let gpu = gpu();
    let c = BertConfig::tiny(1, 8, 2);
    let mut weights = weights(&c, 90);
    weights.remove("encoder.layer.0.output.dense.bias");
    let error = Bert::upload(gpu, &c, &weights).err().unwrap().to_string();
    assert!(error.contains("'encoder.layer.0.output.dense.bias'"), "{error}");
    let mut weights = self::weights(&c, 90);
    weights.get_mut("pooler.dense.weight").unwrap().shape = vec![4, 16];
    let error = Bert::upload(gpu, &c, &weights).err().unwrap();
    assert!(matches!(error, ModelError::Weights { .. }) && error.to_string().contains("pooler.dense.weight"));

    let bert = Bert::upload(gpu, &c, &self::weights(&c, 90)).unwrap();
    let acts = bert.activations(gpu, 2, 5).unwrap();
    let inputs = BatchInputs::upload(gpu, &c, &encoder_batch(&c, 2, 4, 91)).unwrap();
    let mut rec = gpu.recorder();
    let error = bert.forward(&mut rec, &acts, &inputs, None).unwrap_err();
    assert!(matches!(error, GpuError::Shape { .. }), "{error}");
    let mut inputs = BatchInputs::new(gpu, &c, 2, 5).unwrap();
    let mut batch = encoder_batch(&c, 2, 5, 92);
    batch.ids[3] = c.vocab_size as u32;
    assert!(matches!(inputs.write(gpu, &batch), Err(GpuError::Shape { .. })));
    let wrong: Tensor = gpu.zeros("d_pooled", &[3, 8]).unwrap();
    let inputs = BatchInputs::upload(gpu, &c, &encoder_batch(&c, 2, 5, 93)).unwrap();
    let d_seq = gpu.zeros("d_seq", &[10, 8]).unwrap();
    let error = bert.backward(&mut rec, &acts, &inputs, &d_seq, &wrong, None).unwrap_err();
    assert!(error.to_string().contains("'d_pooled'"), "{error}");
}

/// The memory report's activation and input bytes are what the GPU buffers hold.
#[test]
fn memory_plan_matches_allocation() {
    let gpu = gpu();
    let c = tiny();
    let bert = Bert::upload(gpu, &c, &weights(&c, 100)).unwrap();
    let acts = bert.activations(gpu, 3, 13).unwrap();
    let inputs = BatchInputs::new(gpu, &c, 3, 13).unwrap();
    let plan = MemoryPlan::new(&c, 3, 13);
    assert_eq!(acts.bytes(), plan.activations);
    assert_eq!(Activations::plan(&c, 3, 13).len(), acts.all.len());
    let input_bytes: u64 = inputs.all.iter().map(|t| t.buffer.size()).sum();
    assert_eq!(input_bytes, plan.inputs);
    let param_bytes: u64 = bert.params.named.iter().map(|(_, t)| tensor_bytes(&t.shape)).sum();
    assert_eq!(param_bytes, plan.parameters);
    // Inference: no gradients, and only the forward's buffers.
    let eval = Bert::upload_inference(gpu, &c, &weights(&c, 100)).unwrap();
    let eval_acts = eval.activations(gpu, 3, 13).unwrap();
    let eval_plan = MemoryPlan::inference(&c, 3, 13);
    assert_eq!(eval_acts.bytes(), eval_plan.activations);
    assert!(eval_plan.activations < plan.activations && eval_plan.gradients == 0 && eval_plan.adam == 0);
    assert!(eval.grads.is_none() && eval.download_grads(gpu).is_err());
    // Mixed precision: q, k, v and the FFN's intermediates are f16, and the f16 weight
    // copies count.
    let mut mixed = Bert::upload(gpu, &c, &weights(&c, 100)).unwrap();
    let copies = mixed.use_f16_weights(gpu).unwrap();
    let mixed_acts = mixed.activations(gpu, 3, 13).unwrap();
    let mixed_plan = MemoryPlan::training(&c, 3, 13, true);
    assert_eq!(mixed_acts.bytes(), mixed_plan.activations);
    assert!(mixed_plan.activations < plan.activations, "f16 intermediates take less");
    let f16 = |t: &pals::gpu::Tensor| t.dtype == pals::gpu::ElementType::F16;
    let half: Vec<&str> = mixed_acts.all.iter().filter(|t| f16(t)).map(|t| t.name.as_str()).collect();
    assert_eq!(
        half.len(),
        4 * c.num_hidden_layers + 2,
        "layer.*.{{q,k,v,pre}}, scratch.ffn_a and _b: {half:?}"
    );
    let copy_bytes: u64 = copies.iter().map(|(_, t)| t.buffer.size()).sum();
    assert_eq!(copy_bytes, mixed_plan.f16_weights);
    let (f32_rest, mixed_rest) =
        (plan.total() - plan.activations, mixed_plan.total() - mixed_plan.activations);
    assert_eq!(mixed_rest, f32_rest + mixed_plan.f16_weights, "only activations and the copies differ");
}

/// Dispatches per training step (forward + backward, dropout on) at BERT-base's batch 32 x
/// 128 tokens and 12 layers: the count depends on layers and rows, not on widths, so a
/// narrow model stands in. Recorded only, never submitted.
#[test]
fn dispatch_count_per_step() {
    let gpu = gpu();
    let c = BertConfig { max_position_embeddings: 128, ..BertConfig::tiny(12, 32, 1) };
    let bert = Bert::upload(gpu, &c, &random_weights(&c, 110)).unwrap();
    let (batch, seq) = (32, 128);
    let acts = bert.activations(gpu, batch, seq).unwrap();
    let inputs = BatchInputs::upload(gpu, &c, &encoder_batch(&c, batch, seq, 111)).unwrap();
    let d_seq = gpu.zeros("d_seq", &[batch * seq, c.hidden_size]).unwrap();
    let d_pooled = gpu.zeros("d_pooled", &[batch, c.hidden_size]).unwrap();
    let mut rec = gpu.recorder();
    bert.forward(&mut rec, &acts, &inputs, Some(KEY)).unwrap();
    let forward = rec.len();
    bert.backward(&mut rec, &acts, &inputs, &d_seq, &d_pooled, Some(KEY)).unwrap();
    eprintln!("dispatches at 32x128, 12 layers: forward {forward}, forward + backward {}", rec.len());
    // Forward: 3 (embeddings) + 8 per layer besides attention (the two output dropouts are
    // drawn in their products' epilogues) + 2 (pooler). Backward:
    // 5 (pooler) + 35 per layer (two-pass column sums past 256 rows; the two output
    // dropouts' gradients come from the LayerNorms' backward, GELU's from a product's
    // epilogue) besides attention + 12 (embeddings). Attention takes 1 forward and 3 backward dispatches fused; unfused, per
    // workspace chunk Q·Kᵀ, softmax, P·V and Q·Kᵀ, dO·Vᵀ, softmax backward, dV, dK, dQ,
    // after one delta prepass.
    let layer_shape = AttentionShape { batch, seq, heads: c.num_attention_heads, head_dim: c.head_dim() };
    let path = attention::path(gpu, layer_shape, pals::gpu::ElementType::F32).unwrap();
    let shape = AttentionShape { batch, seq, heads: 1, head_dim: 32 };
    let chunks = attention::chunk_count(shape, attention::workspace_limit(gpu));
    // Where products run on the subgroup kernel (CPU adapters with subgroups), each whose B
    // is transposed first repacks B: the six x·Wᵀ of a layer's forward, the pooler's, and
    // on the unfused path Q·Kᵀ (forward and backward) and dO·Vᵀ per chunk.
    let repacks = usize::from(matmul::subgroup_unavailable(gpu).is_none());
    let (attention_forward, attention_backward) = match path {
        AttentionPath::Fused => (1, 3),
        AttentionPath::Unfused => ((3 + repacks) * chunks, 1 + (6 + 2 * repacks) * chunks),
    };
    eprintln!("attention path: {}; B repacked: {}", path.name(), repacks == 1);
    assert_eq!(forward, 3 + (8 + 6 * repacks + attention_forward) * 12 + 2 + repacks);
    assert_eq!(rec.len(), forward + 5 + (35 + attention_backward) * 12 + 12);
}
