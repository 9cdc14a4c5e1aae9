//! Attention on the GPU against the CPU reference, forward (o, lse) and backward (dq, dk,
//! dv), on both paths: fused (one kernel family) and unfused (batched matmuls and the
//! softmax row kernels, CPU adapters' default). Tolerances: forward rtol 1e-4, atol 1e-5; backward rtol 5e-4, atol 5e-5
//! (f32 sums over S keys and D dims against f64, gradients with two more such sums).
//! q, k and v also as f16 storage (mixed precision), against the reference on the same
//! f16-rounded values.

mod common;

use common::{assert_close, gpu};
use pals::gpu::{ElementType, Gpu, GpuError, Tensor};
use pals::kernels::attention::{self, AttentionPath, AttentionShape};
use pals::kernels::elementwise::DropoutSpec;
use pals::reference::{self, random_vec, round_f16};

const FORWARD_TOL: (f32, f32) = (1e-4, 1e-5);
const BACKWARD_TOL: (f32, f32) = (5e-4, 5e-5);

fn shape(batch: usize, seq: usize, heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape { batch, seq, heads, head_dim }
}

fn drop(p: f32) -> DropoutSpec {
    DropoutSpec { p, seed: 1234, stream: 7, shard: 0 }
}

/// Host inputs of one case: q, k, v, dO and a mask padding the last `pad` keys of the
/// last sequence.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_out: Vec<f32>,
    mask: Vec<f32>,
}

impl Inputs {
    fn new(shape: AttentionShape, pad: usize) -> Inputs {
        let n = shape.qkv_len();
        let mut mask = vec![0.0; shape.mask_len()];
        let len = mask.len();
        for m in &mut mask[len - pad..] {
            *m = -10000.0;
        }
        Inputs {
            q: random_vec(n, 21, 1.0),
            k: random_vec(n, 22, 1.0),
            v: random_vec(n, 23, 1.0),
            d_out: random_vec(n, 24, 1.0),
            mask,
        }
    }

    /// The same case with q, k and v rounded to f16: what f16 storage holds exactly.
    fn rounded_f16(self) -> Inputs {
        Inputs { q: round_f16(&self.q), k: round_f16(&self.k), v: round_f16(&self.v), ..self }
    }
}

/// GPU results of one forward and backward: o, lse, dq, dk, dv.
struct Outputs {
    o: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

const PATHS: [AttentionPath; 2] = [AttentionPath::Fused, AttentionPath::Unfused];

fn run_gpu(
    gpu: &Gpu,
    path: AttentionPath,
    shape: AttentionShape,
    x: &Inputs,
    scale: f32,
    dropout: DropoutSpec,
) -> Outputs {
    run_gpu_as(gpu, path, shape, x, scale, dropout, ElementType::F32)
}

/// `run_gpu` with q, k and v stored as `qkv` (f16 rounds them: exact for `rounded_f16`
/// inputs); every other tensor is f32.
fn run_gpu_as(
    gpu: &Gpu,
    path: AttentionPath,
    shape: AttentionShape,
    x: &Inputs,
    scale: f32,
    dropout: DropoutSpec,
    qkv: ElementType,
) -> Outputs {
    let dims = [shape.batch, shape.seq, shape.heads, shape.head_dim];
    let rows = [shape.batch, shape.heads, shape.seq];
    let up = |name: &str, data: &[f32]| gpu.upload(name, &dims, data).unwrap();
    let up_qkv = |name: &str, data: &[f32]| match qkv {
        ElementType::F32 => up(name, data),
        ElementType::F16 => gpu.upload_f16(name, &dims, data).unwrap(),
    };
    let zeros = |name: &str, shape: &[usize]| -> Tensor { gpu.zeros(name, shape).unwrap() };
    let (q, k, v) = (up_qkv("q", &x.q), up_qkv("k", &x.k), up_qkv("v", &x.v));
    let d_out = up("dO", &x.d_out);
    let mask = gpu.upload("mask", &[shape.batch, shape.seq], &x.mask).unwrap();
    let (o, lse, delta) = (zeros("o", &dims), zeros("lse", &rows), zeros("delta", &rows));
    let (dq, dk, dv) = (zeros("dq", &dims), zeros("dk", &dims), zeros("dv", &dims));
    let mut rec = gpu.recorder();
    attention::attention_forward_on(path, &mut rec, shape, &q, &k, &v, &mask, &o, &lse, scale, dropout)
        .unwrap();
    attention::attention_backward_on(
        path, &mut rec, shape, &q, &k, &v, &o, &d_out, &mask, &lse, &delta, &dq, &dk, &dv, scale, dropout,
    )
    .unwrap();
    rec.submit().unwrap();
    Outputs {
        o: gpu.read::<f32>(&o).unwrap(),
        lse: gpu.read::<f32>(&lse).unwrap(),
        dq: gpu.read::<f32>(&dq).unwrap(),
        dk: gpu.read::<f32>(&dk).unwrap(),
        dv: gpu.read::<f32>(&dv).unwrap(),
    }
}

/// Both paths against the reference.
fn check(shape: AttentionShape, pad: usize, p: f32) {
    check_paths(&PATHS, shape, pad, drop(p));
}

fn check_paths(paths: &[AttentionPath], shape: AttentionShape, pad: usize, dropout: DropoutSpec) {
    check_inputs(paths, shape, &Inputs::new(shape, pad), pad, dropout, ElementType::F32);
}

/// `paths` on `x` with q, k and v stored as `qkv` against the reference on `x`.
fn check_inputs(
    paths: &[AttentionPath],
    shape: AttentionShape,
    x: &Inputs,
    pad: usize,
    dropout: DropoutSpec,
    qkv: ElementType,
) {
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let r = reference::attention::forward(&shape, &x.q, &x.k, &x.v, &x.mask, scale, &dropout);
    let (dq, dk, dv) =
        reference::attention::backward(&shape, &x.q, &x.k, &x.v, &x.mask, &x.d_out, scale, &dropout);
    for &path in paths {
        let got = run_gpu_as(gpu(), path, shape, x, scale, dropout, qkv);
        let case = format!(
            "{} path, {qkv:?} q/k/v, {shape:?} pad={pad} p={} shard {}",
            path.name(),
            dropout.p,
            dropout.shard
        );
        let (rtol, atol) = FORWARD_TOL;
        assert_close(&format!("o {case}"), &got.o, &r.0, rtol, atol);
        assert_close(&format!("lse {case}"), &got.lse, &r.1, rtol, atol);
        let (rtol, atol) = BACKWARD_TOL;
        assert_close(&format!("dq {case}"), &got.dq, &dq, rtol, atol);
        assert_close(&format!("dk {case}"), &got.dk, &dk, rtol, atol);
        assert_close(&format!("dv {case}"), &got.dv, &dv, rtol, atol);
    }
}

#[test]
fn single_token_single_head() {
    check(shape(1, 1, 1, 64), 0, 0.0);
    check(shape(1, 1, 1, 64), 0, 0.1);
}

#[test]
fn pal_head_dim_34_with_padding() {
    for p in [0.0, 0.1] {
        check(shape(2, 7, 3, 34), 3, p);
    }
}

#[test]
fn minilm_head_dim_32_odd_length() {
    for p in [0.0, 0.1] {
        check(shape(2, 13, 2, 32), 2, p);
    }
}

#[test]
fn bert_head_dim_64_several_tiles() {
    // 128 keys = 4 key tiles of 32 and 2 query blocks of 64; 70 = partial blocks.
    check(shape(1, 128, 2, 64), 0, 0.0);
    check(shape(1, 128, 2, 64), 5, 0.1);
    check(shape(2, 70, 1, 64), 9, 0.1);
}

/// A data-parallel rank's slice (shard 1): its mask indices start past shard 0's tensor.
#[test]
fn shard_one_draws_its_slice_of_the_global_mask() {
    check_paths(&PATHS, shape(2, 13, 2, 32), 2, DropoutSpec { shard: 1, ..drop(0.3) });
}

#[test]
fn other_head_dims() {
    check(shape(1, 19, 2, 128), 4, 0.1);
    check(shape(1, 33, 1, 8), 0, 0.1);
    check(shape(1, 5, 2, 1), 1, 0.0);
}

#[test]
fn longest_sequence_512() {
    check(shape(1, 512, 1, 32), 100, 0.1);
}

/// The unfused path's products on shapes no tile divides (S = 130 rows and keys, head dims
/// 32, 34, 64), several sequences and heads, masks and dropout.
#[test]
fn unfused_sequence_130() {
    for d in [32, 34, 64] {
        check_paths(&[AttentionPath::Unfused], shape(2, 130, 3, d), 17, drop(0.1));
    }
    check_paths(&[AttentionPath::Unfused], shape(3, 130, 2, 64), 0, drop(0.0));
}

/// Chunks of the workspace: 12 heads of 512 keys take 12 MiB of scores per sequence, more
/// than a CPU adapter's workspace of 1 MiB, so each of three sequences is a chunk of its
/// own; 4 heads of 100 keys take 160,000 bytes, so 6 of 7 sequences fit one chunk and the
/// seventh follows at an offset. (GPUs' 64 MiB take each batch whole; CI's lavapipe runs
/// the chunks.)
#[test]
fn unfused_chunks_of_long_sequences() {
    let limit = attention::workspace_limit(gpu());
    eprintln!("workspace limit on this adapter: {limit} bytes");
    let cpu = attention::CPU_WORKSPACE_BYTES;
    let long = shape(3, 512, 12, 8);
    assert_eq!(attention::workspace_bytes(long, false, cpu), 12 * 512 * 512 * 4);
    check_paths(&[AttentionPath::Unfused], long, 50, drop(0.1));
    let many = shape(7, 100, 4, 16);
    assert_eq!(attention::workspace_bytes(many, false, cpu), 1 << 20);
    assert_eq!(attention::chunk_count(many, cpu), 2);
    assert_eq!(attention::chunk_count(many, attention::GPU_WORKSPACE_BYTES), 1);
    check_paths(&[AttentionPath::Unfused], many, 9, drop(0.1));
}

/// f16 q, k and v (mixed precision's storage) on both paths, against the reference on the
/// f16-rounded values. Those are exact in f32, so each path reads exactly the reference's
/// inputs and only its f32 sums differ from the f64 reference, as in the f32 tests: the f32
/// tolerances hold unchanged. S = 130 and 67 fill no 64-row block, 32- or 64-key tile or
/// matmul tile; head dims 32 and 64 (MiniLM, BERT); padded keys and dropout.
#[test]
fn f16_qkv_both_paths() {
    for d in [32, 64] {
        let shape = shape(2, 130, 3, d);
        let x = Inputs::new(shape, 17).rounded_f16();
        check_inputs(&PATHS, shape, &x, 17, drop(0.1), ElementType::F16);
    }
    let short = shape(1, 67, 2, 64);
    check_inputs(&PATHS, short, &Inputs::new(short, 5).rounded_f16(), 5, drop(0.0), ElementType::F16);
}

/// q, k and v of different types are refused naming the odd one and q (an f32 among f16
/// and an f16 among f32); all-f16 ones on an adapter without shader-f16 are refused naming
/// the op; every other tensor must stay f32.
#[test]
fn f16_qkv_refusals() {
    let gpu = gpu();
    let shape = shape(1, 5, 2, 8);
    let dims = [1, 5, 2, 8];
    let f32s = |name: &str| gpu.zeros(name, &dims).unwrap();
    let f16s = |name: &str| gpu.zeros_of(name, &dims, ElementType::F16).unwrap();
    let (o, d_out, dq, dk, dv) = (f32s("o"), f32s("dO"), f32s("dq"), f32s("dk"), f32s("dv"));
    let mask = gpu.zeros("mask", &[1, 5]).unwrap();
    let (lse, delta) = (gpu.zeros("lse", &[1, 2, 5]).unwrap(), gpu.zeros("delta", &[1, 2, 5]).unwrap());
    let none = drop(0.0);
    let mut rec = gpu.recorder();
    for path in PATHS {
        let forward = |rec: &mut _, [q, k, v]: [&Tensor; 3], o: &Tensor| {
            attention::attention_forward_on(path, rec, shape, q, k, v, &mask, o, &lse, 1.0, none)
        };
        let backward = |rec: &mut _, [q, k, v]: [&Tensor; 3], dq: &Tensor| {
            attention::attention_backward_on(
                path, rec, shape, q, k, v, &o, &d_out, &mask, &lse, &delta, dq, &dk, &dv, 1.0, none,
            )
        };
        for (qkv, odd) in
            [([f16s("q"), f32s("k32"), f16s("v")], "'k32'"), ([f32s("q"), f32s("k"), f16s("v16")], "'v16'")]
        {
            let error = message(forward(&mut rec, qkv.each_ref(), &o));
            assert!(error.contains("'q'") && error.contains(odd), "{} path: {error}", path.name());
            let error = message(backward(&mut rec, qkv.each_ref(), &dq));
            assert!(error.contains("'q'") && error.contains(odd), "{} path: {error}", path.name());
        }
        let (q, k, v) = (f16s("q"), f16s("k"), f16s("v"));
        if !gpu.has(wgpu::Features::SHADER_F16) {
            let error = message(forward(&mut rec, [&q, &k, &v], &o));
            assert!(error.contains("attention_forward") && error.contains("shader-f16"), "{error}");
            let error = message(backward(&mut rec, [&q, &k, &v], &dq));
            assert!(error.contains("attention_backward") && error.contains("shader-f16"), "{error}");
            continue;
        }
        let error = message(forward(&mut rec, [&q, &k, &v], &f16s("o16")));
        assert!(error.contains("'o16'") && error.contains("F16"), "{error}");
        let error = message(backward(&mut rec, [&q, &k, &v], &f16s("dq16")));
        assert!(error.contains("'dq16'") && error.contains("F16"), "{error}");
    }
    assert!(rec.is_empty());
}

fn message(result: Result<(), GpuError>) -> String {
    result.unwrap_err().to_string()
}

/// Which path this adapter runs by default, said where a test log shows it.
#[test]
fn default_path_is_named() {
    let gpu = gpu();
    let minilm = shape(8, 128, 12, 32);
    let path = attention::path(gpu, minilm, ElementType::F32).unwrap();
    eprintln!("attention path on {} at MiniLM's shape: {}", gpu.describe(), path.name());
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    if std::env::var_os("PALS_ATTENTION").is_none() && cpu {
        assert_eq!(path, AttentionPath::Unfused, "CPU adapters take the unfused path by rule");
    }
}

/// GPUs measure the two paths once per shape class; the measurement runs here on whatever
/// adapter the tests have: it picks one, remembers it (the second call measures nothing),
/// and the path it picked matches the reference.
#[test]
fn measured_path_is_remembered_and_right() {
    let gpu = gpu();
    let small = shape(3, 40, 2, 16);
    let first = attention::measure_path(gpu, small, ElementType::F32).unwrap();
    let spent = *gpu.tune.spent.lock().unwrap();
    let again = attention::measure_path(gpu, small, ElementType::F32).unwrap();
    eprintln!("measured path on {}: {} (tuning so far {spent:?})", gpu.describe(), first.name());
    assert_eq!(first, again);
    assert_eq!(*gpu.tune.spent.lock().unwrap(), spent, "the second call measured again");
    check_paths(&[first], small, 17, drop(0.1));
}

#[test]
fn results_are_bit_identical_across_runs() {
    let shape = shape(2, 45, 2, 34);
    let x = Inputs::new(shape, 6);
    for path in PATHS {
        bit_identical(path, shape, &x);
    }
}

fn bit_identical(path: AttentionPath, shape: AttentionShape, x: &Inputs) {
    let first = run_gpu(gpu(), path, shape, x, 0.17, drop(0.1));
    let second = run_gpu(gpu(), path, shape, x, 0.17, drop(0.1));
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    for (what, a, b) in [
        ("o", &first.o, &second.o),
        ("lse", &first.lse, &second.lse),
        ("dq", &first.dq, &second.dq),
        ("dk", &first.dk, &second.dk),
        ("dv", &first.dv, &second.dv),
    ] {
        assert_eq!(bits(a), bits(b), "{what} differs between runs on the {} path", path.name());
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let gpu = gpu();
    let shape = shape(2, 7, 3, 34);
    let dims = [2, 7, 3, 34];
    let ok = |name: &str| gpu.zeros(name, &dims).unwrap();
    let (q, k, v, o) = (ok("q"), ok("k"), ok("v"), ok("o"));
    let mask = gpu.zeros("mask", &[2, 7]).unwrap();
    let lse = gpu.zeros("lse", &[2, 3, 7]).unwrap();
    let bad_mask = gpu.zeros("bad_mask", &[2, 8]).unwrap();
    let bad_lse = gpu.zeros("bad_lse", &[2, 3, 6]).unwrap();
    let mut rec = gpu.recorder();
    let none = drop(0.0);
    let error = attention::attention_forward(&mut rec, shape, &q, &k, &v, &bad_mask, &o, &lse, 1.0, none)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'bad_mask'") && error.contains("[2, 8]"), "{error}");
    let error = attention::attention_backward(
        &mut rec, shape, &q, &k, &v, &o, &o, &mask, &bad_lse, &lse, &q, &k, &v, 1.0, none,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("'bad_lse'"), "{error}");
    let wide = AttentionShape { head_dim: 300, ..shape };
    let error = attention::attention_forward(&mut rec, wide, &q, &k, &v, &mask, &o, &lse, 1.0, none)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'q'"), "{error}");
    // Consistent tensors but a head too wide for the kernel's register arrays.
    let wide = AttentionShape { batch: 1, seq: 1, heads: 1, head_dim: 200 };
    let row = |name: &str| gpu.zeros(name, &[200]).unwrap();
    let (q, o) = (row("q"), row("o"));
    let one = gpu.zeros("one", &[1]).unwrap();
    let lse = gpu.zeros("lse", &[1]).unwrap();
    let error = attention::attention_forward(&mut rec, wide, &q, &q, &q, &one, &o, &lse, 1.0, none)
        .unwrap_err()
        .to_string();
    assert!(error.contains("head_dim"), "{error}");
    assert!(rec.is_empty());
}

/// GPU time of each dispatch of the forward and backward at MiniLM's and BERT-base's
/// training shapes and a PAL-sized one, on this adapter's path (`PALS_ATTENTION` picks
/// another): `cargo test --test attention -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing() {
    let gpu = gpu();
    for shape in [shape(8, 128, 12, 32), shape(32, 128, 12, 64), shape(32, 128, 6, 34)] {
        let x = Inputs::new(shape, 0);
        // Compile (and tune) and warm up; with a cold MESA_SHADER_CACHE_DIR this is the
        // path's pipeline builds.
        let started = std::time::Instant::now();
        let path = attention::path(gpu, shape, ElementType::F32).unwrap();
        run_gpu(gpu, path, shape, &x, 0.125, drop(0.1));
        eprintln!("{shape:?}: first forward + backward {:.2} s", started.elapsed().as_secs_f64());
        let dims = [shape.batch, shape.seq, shape.heads, shape.head_dim];
        let rows = [shape.batch, shape.heads, shape.seq];
        let t = |name: &str, s: &[usize]| gpu.zeros(name, s).unwrap();
        let (q, k, v, o, d_out) =
            (t("q", &dims), t("k", &dims), t("v", &dims), t("o", &dims), t("dO", &dims));
        let (dq, dk, dv) = (t("dq", &dims), t("dk", &dims), t("dv", &dims));
        let (mask, lse, delta) = (t("mask", &[shape.batch, shape.seq]), t("lse", &rows), t("delta", &rows));
        for _ in 0..3 {
            let mut rec = gpu.recorder();
            attention::attention_forward(&mut rec, shape, &q, &k, &v, &mask, &o, &lse, 0.125, drop(0.1))
                .unwrap();
            attention::attention_backward(
                &mut rec,
                shape,
                &q,
                &k,
                &v,
                &o,
                &d_out,
                &mask,
                &lse,
                &delta,
                &dq,
                &dk,
                &dv,
                0.125,
                drop(0.1),
            )
            .unwrap();
            let timings = rec.submit_timed().unwrap();
            let report: Vec<String> =
                timings.iter().map(|t| format!("{} {:.3} ms", t.label, t.nanos / 1e6)).collect();
            eprintln!("{shape:?}: {}", report.join(", "));
        }
    }
}
