//! Matmul on the GPU against the CPU reference: every kernel (each tile candidate, the
//! subgroup kernel where the adapter has subgroups), every transpose, every epilogue, shapes
//! that are not multiples of any tile, batches, strides, errors.

mod common;

use common::{assert_close, gpu};
use pals::contract::DropoutSpec;
use pals::gpu::{ElementType, Gpu, GpuError, Tensor};
use pals::kernels::elementwise;
use pals::kernels::matmul::{
    self, Epilogue, InnerBatch, Kernel, Matmul, f32_kernels, runnable_tiles, usable_tiles,
};
use pals::reference::{self, random_vec, round_f16};

// f32 sums over K against f64: relative error grows like sqrt(K)·eps.
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

// N = 36 and 44 are whole vec4s, so the subgroup kernel reads B in place (untransposed); the
// other widths make it repack B first. M = 20 lets it read a transposed A four rows at a
// time, with partial last rows and a partial last chunk of k.
const SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (7, 5, 1), (1, 9, 33), (33, 65, 17), (20, 36, 45), (130, 70, 200), (41, 44, 9)];

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

/// The subgroup kernel runs where the adapter has fixed-size subgroups; on lavapipe (CI's
/// adapter) it must, since it is what CPU adapters multiply with.
fn subgroup_kernel_runs(gpu: &Gpu) -> bool {
    match matmul::subgroup_unavailable(gpu) {
        None => true,
        Some(why) => {
            assert!(!gpu.info.name.contains("llvmpipe"), "lavapipe must run the subgroup kernel: {why}");
            eprintln!("subgroup kernel NOT run here: {why}");
            false
        }
    }
}

#[test]
fn every_kernel_and_transpose_matches_reference() {
    let gpu = gpu();
    // Every candidate, also those the tuner only measures on other kinds of adapter.
    let tiles = runnable_tiles(gpu);
    assert!(tiles.len() >= 8, "expected the CPU and the discrete-GPU tiles, got {tiles:?}");
    assert!(tiles.iter().any(|t| t.stages == 2), "no double-buffered tile runs here: {tiles:?}");
    assert!(usable_tiles(gpu).iter().all(|t| tiles.contains(t)));
    let kernels = f32_kernels(gpu);
    assert_eq!(kernels.contains(&Kernel::Subgroup), subgroup_kernel_runs(gpu));
    let mut b_paths = [0, 0, 0]; // subgroup products with B repacked, read in place, repacked in blocks
    let mut a_paths = [[0, 0], [0, 0]]; // [trans_a][A read as scalars, as vec4s]
    for &(m, n, k) in SHAPES {
        let a_host = random_vec(m * k, 1, 1.0);
        let b_host = random_vec(k * n, 2, 1.0);
        let want = reference::matmul::matmul(&a_host, &b_host, m, n, k, false, false);
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let a_stored = if trans_a { transpose(&a_host, m, k) } else { a_host.clone() };
            let b_stored = if trans_b { transpose(&b_host, k, n) } else { b_host.clone() };
            let a = gpu.upload("a", &[a_stored.len()], &a_stored).unwrap();
            let b = gpu.upload("b", &[b_stored.len()], &b_stored).unwrap();
            let mut op = Matmul::new(m, n, k);
            op.trans_a = trans_a;
            op.trans_b = trans_b;
            for &kernel in &kernels {
                let c = gpu.zeros("c", &[m, n]).unwrap();
                let mut rec = gpu.recorder();
                matmul::matmul_with(&mut rec, &a, &b, &c, &op, Epilogue::None, kernel).unwrap();
                rec.submit().unwrap();
                let what = format!("{m}x{n}x{k} ta={trans_a} tb={trans_b} {kernel:?}");
                assert_close(&what, &gpu.read::<f32>(&c).unwrap(), &want, RTOL, ATOL);
                if kernel == Kernel::Subgroup {
                    let path = match matmul::subgroup_reads_b_in_place(&op) {
                        true => 1,
                        false if matmul::subgroup_packs_b_in_blocks(&op) => 2,
                        false => 0,
                    };
                    b_paths[path] += 1;
                    a_paths[trans_a as usize][matmul::subgroup_reads_a_as_vec4(&op) as usize] += 1;
                }
            }
        }
    }
    if kernels.contains(&Kernel::Subgroup) {
        let [repacked, in_place, blocks] = b_paths;
        eprintln!(
            "subgroup kernel, B: {repacked} repacked, {blocks} repacked in 4x4 blocks, {in_place} read in place"
        );
        assert!(b_paths.iter().all(|&count| count > 0), "every way of reading B is tested: {b_paths:?}");
        eprintln!(
            "subgroup kernel, A as scalars / as vec4s: {:?} untransposed, {:?} transposed",
            a_paths[0], a_paths[1]
        );
        let tested = a_paths[0][0] > 0 && a_paths[1][0] > 0 && a_paths[1][1] > 0;
        assert!(
            tested && a_paths[0][1] == 0,
            "only transposed A is read as vec4s, both ways tested: {a_paths:?}"
        );
    }
}

/// y = x·Wᵀ + b at a shape no tile divides: the operands on the GPU and the reference.
struct LinearCase {
    dims: (usize, usize, usize),
    x_host: Vec<f32>,
    w_host: Vec<f32>,
    x: Tensor,
    w: Tensor,
    bias: Tensor,
    /// The reference y.
    linear: Vec<f32>,
    op: Matmul,
}

fn linear_case(gpu: &Gpu, seed: u32) -> LinearCase {
    let (m, n, k) = (37, 29, 41);
    let x_host = random_vec(m * k, seed, 1.0);
    let w_host = random_vec(n * k, seed + 1, 0.5);
    let bias_host = random_vec(n, seed + 2, 1.0);
    let linear = reference::matmul::linear_forward(&x_host, &w_host, Some(&bias_host), m, n, k);
    LinearCase {
        dims: (m, n, k),
        x: gpu.upload("x", &[m, k], &x_host).unwrap(),
        w: gpu.upload("w", &[n, k], &w_host).unwrap(),
        bias: gpu.upload("bias", &[n], &bias_host).unwrap(),
        x_host,
        w_host,
        linear,
        op: Matmul::new(m, n, k).trans_b(),
    }
}

#[test]
fn epilogues_bias_gelu_and_accumulate() {
    let gpu = gpu();
    let LinearCase { dims: (m, n, k), x_host, w_host, x, w, bias, linear, op } = linear_case(gpu, 3);
    for kernel in f32_kernels(gpu) {
        let y = gpu.zeros("y", &[m, n]).unwrap();
        let gelu = gpu.zeros("gelu", &[m, n]).unwrap();
        let pre = gpu.zeros("pre", &[m, n]).unwrap();
        let acc = gpu.upload("acc", &[m, n], &linear).unwrap();
        let mut rec = gpu.recorder();
        matmul::matmul_with(&mut rec, &x, &w, &y, &op, Epilogue::Bias(&bias), kernel).unwrap();
        let fused = Epilogue::BiasGelu { bias: &bias, pre: &pre };
        matmul::matmul_with(&mut rec, &x, &w, &gelu, &op, fused, kernel).unwrap();
        matmul::matmul_with(&mut rec, &x, &w, &acc, &op, Epilogue::Accumulate, kernel).unwrap();
        rec.submit().unwrap();
        assert_close("bias", &gpu.read::<f32>(&y).unwrap(), &linear, RTOL, ATOL);
        assert_close("pre-activation", &gpu.read::<f32>(&pre).unwrap(), &linear, RTOL, ATOL);
        let want_gelu = reference::elementwise::gelu_forward(&linear);
        assert_close("bias+gelu", &gpu.read::<f32>(&gelu).unwrap(), &want_gelu, RTOL, ATOL);
        let no_bias = reference::matmul::matmul(&x_host, &w_host, m, n, k, false, true);
        let twice: Vec<f32> = linear.iter().zip(&no_bias).map(|(a, b)| a + b).collect();
        assert_close("accumulate", &gpu.read::<f32>(&acc).unwrap(), &twice, RTOL, ATOL);
    }
}

/// The dropout epilogue draws elementwise::dropout's mask over C: bit for bit the product
/// with bias followed by the separate dropout pass, on every kernel and for a rank's shard.
#[test]
fn dropout_epilogue_matches_the_separate_pass() {
    let gpu = gpu();
    let LinearCase { dims: (m, n, _), x, w, bias, linear, op, .. } = linear_case(gpu, 6);
    for shard in [0, 3] {
        let drop = DropoutSpec { p: 0.3, seed: 11, stream: 5, shard };
        let want = reference::elementwise::dropout(&linear, &drop);
        let dropped = want.iter().filter(|&&v| v == 0.0).count();
        assert!(dropped > 0 && dropped < want.len(), "shard {shard}: {dropped} of {} dropped", want.len());
        for kernel in f32_kernels(gpu) {
            let (fused, plain, separate) = (
                gpu.zeros("fused", &[m, n]).unwrap(),
                gpu.zeros("plain", &[m, n]).unwrap(),
                gpu.zeros("separate", &[m, n]).unwrap(),
            );
            let mut rec = gpu.recorder();
            let epilogue = Epilogue::BiasDropout { bias: &bias, drop };
            matmul::matmul_with(&mut rec, &x, &w, &fused, &op, epilogue, kernel).unwrap();
            matmul::matmul_with(&mut rec, &x, &w, &plain, &op, Epilogue::Bias(&bias), kernel).unwrap();
            elementwise::dropout(&mut rec, &plain, &separate, drop).unwrap();
            rec.submit().unwrap();
            let what = format!("shard {shard} {kernel:?}");
            let fused = gpu.read::<f32>(&fused).unwrap();
            assert_eq!(
                fused,
                gpu.read::<f32>(&separate).unwrap(),
                "{what}: fused and separate dropout differ"
            );
            assert_close(&what, &fused, &want, RTOL, ATOL);
        }
    }
    // The mask indexes C's elements: C must be exactly the product.
    let tall = gpu.zeros("tall", &[m + 1, n]).unwrap();
    let drop = DropoutSpec { p: 0.3, seed: 11, stream: 5, shard: 0 };
    let epilogue = Epilogue::BiasDropout { bias: &bias, drop };
    let error = matmul::matmul(&mut gpu.recorder(), &x, &w, &tall, &op, epilogue).unwrap_err();
    assert!(error.to_string().contains("dropout epilogue"), "{error}");
}

/// The GELU-backward epilogue: bit for bit the product followed by the separate
/// elementwise::gelu_backward pass, on every kernel, and the reference's GELU backward of
/// the product.
#[test]
fn gelu_backward_epilogue_matches_the_separate_pass() {
    let gpu = gpu();
    let LinearCase { dims: (m, n, k), x_host, w_host, x, w, op, .. } = linear_case(gpu, 8);
    let pre_host = random_vec(m * n, 9, 3.0);
    let pre = gpu.upload("pre", &[m, n], &pre_host).unwrap();
    let product = reference::matmul::matmul(&x_host, &w_host, m, n, k, false, true);
    let want = reference::elementwise::gelu_backward(&pre_host, &product);
    for kernel in f32_kernels(gpu) {
        let [fused, plain, separate] =
            ["fused", "plain", "separate"].map(|name| gpu.zeros(name, &[m, n]).unwrap());
        let mut rec = gpu.recorder();
        let epilogue = Epilogue::GeluBackward { pre: &pre };
        matmul::matmul_with(&mut rec, &x, &w, &fused, &op, epilogue, kernel).unwrap();
        matmul::matmul_with(&mut rec, &x, &w, &plain, &op, Epilogue::None, kernel).unwrap();
        elementwise::gelu_backward(&mut rec, &pre, &plain, &separate).unwrap();
        rec.submit().unwrap();
        let what = format!("gelu backward {kernel:?}");
        let fused = gpu.read::<f32>(&fused).unwrap();
        assert_eq!(fused, gpu.read::<f32>(&separate).unwrap(), "{what}: fused and separate differ");
        assert_close(&what, &fused, &want, RTOL, ATOL);
    }
    let short = gpu.zeros("short pre", &[m * n - 1]).unwrap();
    let c = gpu.zeros("c", &[m, n]).unwrap();
    let error = matmul::matmul(&mut gpu.recorder(), &x, &w, &c, &op, Epilogue::GeluBackward { pre: &short })
        .unwrap_err()
        .to_string();
    assert!(error.contains("'short pre'"), "{error}");
}

/// Mixed precision's steps let every product round f32 operands to f16 (as AMP does), so
/// the tuner also measures cooperative matrices for products stored f32 (task modules,
/// the pooler); without the recorder's permission an f32 product never takes them. Where
/// the adapter has none, the product stays on the tiles and the test says why.
#[test]
fn rounding_to_f16_is_asked_for_not_assumed() {
    let gpu = gpu();
    let op = Matmul::new(64, 48, 32).trans_b();
    let (a, b) = (gpu.zeros("a", &[64, 32]).unwrap(), gpu.zeros("b", &[48, 32]).unwrap());
    let mut rec = gpu.recorder();
    let plain = matmul::kernel_for(&rec, &a, &b, &op).unwrap();
    assert_ne!(plain, Kernel::Coop, "an f32 product took cooperative matrices unasked");
    rec.round_products_to_f16(true);
    let rounded = matmul::kernel_for(&rec, &a, &b, &op).unwrap();
    match matmul::coop_unavailable(gpu) {
        Some(why) => {
            eprintln!("f32 operands rounded to f16 stay on {plain:?} here: {why}");
            assert_eq!(rounded, plain);
        }
        None => eprintln!("f32 operands rounded to f16: the tuner measured and took {rounded:?}"),
    }
}

/// CPU adapters take their kernel by a fixed rule, without measuring (each candidate would
/// be seconds of pipeline compile there): the subgroup kernel where the adapter has
/// subgroups (lavapipe does), else the wide CPU tile for the encoder's products and the
/// narrow one as wide as a 32- or 64-wide product. On a GPU the rule says nothing.
#[test]
fn cpu_adapters_take_a_fixed_kernel() {
    let gpu = gpu();
    let wide = Matmul::new(1024, 384, 1536);
    if gpu.info.device_type != wgpu::DeviceType::Cpu {
        assert_eq!(matmul::cpu_rule(gpu, &wide), None);
        eprintln!("'{}' is not a CPU adapter: its kernels are measured, not ruled", gpu.info.name);
        return;
    }
    let ruled = |op: Matmul| matmul::cpu_rule(gpu, &op).expect("a CPU kernel fits lavapipe's limits");
    let widths = [(2, 32), (32, 32), (33, 64), (64, 64), (65, 128), (1536, 128)];
    if subgroup_kernel_runs(gpu) {
        eprintln!("'{}' multiplies on the subgroup kernel", gpu.info.name);
        for op in [wide, wide.trans_a(), wide.trans_b()]
            .into_iter()
            .chain(widths.map(|(n, _)| Matmul::new(128, n, 128)))
        {
            assert_eq!(ruled(op), Kernel::Subgroup, "{op:?}");
            assert_eq!(matmul::choose_kernel(gpu, &op).unwrap(), Kernel::Subgroup, "{op:?}");
        }
        return;
    }
    let Kernel::Tiled(wide_tile) = ruled(wide) else { panic!("no subgroups, yet not a tile") };
    assert_eq!((wide_tile.bm, wide_tile.bn, wide_tile.tm, wide_tile.tn), (256, 128, 16, 16));
    for (n, width) in widths {
        let op = Matmul::new(128, n, 128).trans_a();
        let Kernel::Tiled(tile) = ruled(op) else { panic!("no subgroups, yet not a tile") };
        assert_eq!(tile.bn, width, "product {n} wide");
        assert_eq!(matmul::choose_kernel(gpu, &op).unwrap(), Kernel::Tiled(tile), "{n} wide");
    }
    assert!(usable_tiles(gpu).contains(&wide_tile));
}

/// A Linear layer's backward is two transposed products: dX = dY·W, dW = dYᵀ·X.
#[test]
fn linear_backward_matches_reference() {
    let gpu = gpu();
    for (m, n, k) in [(1, 1, 1), (19, 23, 11), (200, 96, 72), (17, 28, 40)] {
        let x_host = random_vec(m * k, 6, 1.0);
        let w_host = random_vec(n * k, 7, 1.0);
        let dy_host = random_vec(m * n, 8, 1.0);
        let (want_dx, want_dw, _) = reference::matmul::linear_backward(&x_host, &w_host, &dy_host, m, n, k);
        let x = gpu.upload("x", &[m, k], &x_host).unwrap();
        let w = gpu.upload("w", &[n, k], &w_host).unwrap();
        let dy = gpu.upload("dy", &[m, n], &dy_host).unwrap();
        for kernel in f32_kernels(gpu) {
            let dx = gpu.zeros("dx", &[m, k]).unwrap();
            let dw = gpu.zeros("dw", &[n, k]).unwrap();
            let mut rec = gpu.recorder();
            let (dx_op, dw_op) = (Matmul::new(m, k, n), Matmul::new(n, k, m).trans_a());
            matmul::matmul_with(&mut rec, &dy, &w, &dx, &dx_op, Epilogue::None, kernel).unwrap();
            matmul::matmul_with(&mut rec, &dy, &x, &dw, &dw_op, Epilogue::None, kernel).unwrap();
            rec.submit().unwrap();
            assert_close(&format!("dx {kernel:?}"), &gpu.read::<f32>(&dx).unwrap(), &want_dx, RTOL, ATOL);
            assert_close(&format!("dw {kernel:?}"), &gpu.read::<f32>(&dw).unwrap(), &want_dw, RTOL, ATOL);
        }
    }
}

#[test]
fn batched_strided_and_offset_products() {
    let gpu = gpu();
    let (batch, m, n, k) = (3, 5, 7, 9);
    let a_host = random_vec(batch * m * k, 9, 1.0);
    let b_host = random_vec(batch * k * n, 10, 1.0);
    let a = gpu.upload("a", &[batch, m, k], &a_host).unwrap();
    let b = gpu.upload("b", &[batch, k, n], &b_host).unwrap();
    let want: Vec<Vec<f32>> = (0..batch)
        .map(|i| {
            let (a_i, b_i) = (&a_host[i * m * k..][..m * k], &b_host[i * k * n..][..k * n]);
            reference::matmul::matmul(a_i, b_i, m, n, k, false, false)
        })
        .collect();

    // The pooler's input: row 0 of each sequence, i.e. rows of stride seq·hidden.
    let (sequences, seq, hidden, out) = (4, 6, 10, 3);
    let h_host = random_vec(sequences * seq * hidden, 11, 1.0);
    let w_host = random_vec(out * hidden, 12, 1.0);
    let h = gpu.upload("h", &[sequences, seq, hidden], &h_host).unwrap();
    let w = gpu.upload("w", &[out, hidden], &w_host).unwrap();
    let pooler = Matmul { lda: Some(seq * hidden), ..Matmul::new(sequences, out, hidden).trans_b() };
    let cls: Vec<f32> = (0..sequences).flat_map(|s| h_host[s * seq * hidden..][..hidden].to_vec()).collect();
    let want_pooled = reference::matmul::matmul(&cls, &w_host, sequences, out, hidden, false, true);

    // Offsets and padded rows: B's rows 8 of 12 wide from element 4 (whole vec4s, which the
    // subgroup kernel reads in place), A from element 1, C from element 2 with rows of 10.
    let (m2, n2, k2) = (6, 8, 11);
    let a2_host = random_vec(1 + m2 * k2, 13, 1.0);
    let b2_host = random_vec(4 + k2 * 12, 14, 1.0);
    let a2 = gpu.upload("a2", &[a2_host.len()], &a2_host).unwrap();
    let b2 = gpu.upload("b2", &[b2_host.len()], &b2_host).unwrap();
    let padded = Matmul {
        offset_a: 1,
        offset_b: 4,
        offset_c: 2,
        ldb: Some(12),
        ldc: Some(10),
        ..Matmul::new(m2, n2, k2)
    };
    let b2_rows: Vec<f32> = (0..k2).flat_map(|r| b2_host[4 + r * 12..][..n2].to_vec()).collect();
    let want_padded = reference::matmul::matmul(&a2_host[1..], &b2_rows, m2, n2, k2, false, false);

    for kernel in f32_kernels(gpu) {
        let c = gpu.zeros("c", &[batch, m, n]).unwrap();
        let y = gpu.zeros("y", &[sequences, out]).unwrap();
        let c2 = gpu.zeros("c2", &[2 + m2 * 10]).unwrap();
        let mut rec = gpu.recorder();
        let batched = Matmul::new(m, n, k).batched(batch);
        matmul::matmul_with(&mut rec, &a, &b, &c, &batched, Epilogue::None, kernel).unwrap();
        matmul::matmul_with(&mut rec, &h, &w, &y, &pooler, Epilogue::None, kernel).unwrap();
        matmul::matmul_with(&mut rec, &a2, &b2, &c2, &padded, Epilogue::None, kernel).unwrap();
        rec.submit().unwrap();
        let got = gpu.read::<f32>(&c).unwrap();
        for (i, want) in want.iter().enumerate() {
            assert_close(&format!("batch {i} {kernel:?}"), &got[i * m * n..][..m * n], want, RTOL, ATOL);
        }
        assert_close(
            &format!("strided rows {kernel:?}"),
            &gpu.read::<f32>(&y).unwrap(),
            &want_pooled,
            RTOL,
            ATOL,
        );
        let got = gpu.read::<f32>(&c2).unwrap();
        let rows: Vec<f32> = (0..m2).flat_map(|r| got[2 + r * 10..][..n2].to_vec()).collect();
        assert_close(&format!("offsets {kernel:?}"), &rows, &want_padded, RTOL, ATOL);
        let outside: Vec<f32> =
            (0..got.len()).filter(|i| *i < 2 || (i - 2) % 10 >= n2).map(|i| got[i]).collect();
        assert!(outside.iter().all(|&v| v == 0.0), "{kernel:?} wrote outside C's rows: {outside:?}");
    }
    assert!(!matmul::subgroup_reads_b_in_place(&pooler) && matmul::subgroup_reads_b_in_place(&padded));
}

/// Per-head scores of a [B, S, H, D] tensor pair into [B, H, S, S]: batch z = b·H + h
/// nests the heads inside the sequences, and P·V back into [B, S, H, D], on every kernel
/// (S and D are no tile multiples).
#[test]
fn two_level_batches_address_heads() {
    let gpu = gpu();
    // h·d = 36: whole vec4s, so the subgroup kernel reads V in place for P·V below.
    let (b, s, h, d) = (2, 13, 3, 12);
    let q_host = random_vec(b * s * h * d, 15, 1.0);
    let k_host = random_vec(b * s * h * d, 16, 1.0);
    let q = gpu.upload("q", &[b, s, h, d], &q_host).unwrap();
    let k = gpu.upload("k", &[b, s, h, d], &k_host).unwrap();
    let op = Matmul {
        lda: Some(h * d),
        ldb: Some(h * d),
        stride_a: Some(s * h * d),
        stride_b: Some(s * h * d),
        stride_c: Some(h * s * s),
        inner: Some(InnerBatch { count: h, stride_a: d, stride_b: d, stride_c: s * s }),
        ..Matmul::new(s, s, d).trans_b().batched(b * h)
    };
    let head = |x: &[f32], bi: usize, hi: usize| -> Vec<f32> {
        (0..s).flat_map(|si| x[((bi * s + si) * h + hi) * d..][..d].to_vec()).collect()
    };
    // out[b, :, h, :] = scores[b, h] · k[b, :, h, :]: untransposed B, heads inside sequences.
    let p_host = random_vec(b * h * s * s, 17, 1.0);
    let p = gpu.upload("p", &[b, h, s, s], &p_host).unwrap();
    let pv = Matmul {
        ldb: Some(h * d),
        ldc: Some(h * d),
        stride_a: Some(h * s * s),
        stride_b: Some(s * h * d),
        stride_c: Some(s * h * d),
        inner: Some(InnerBatch { count: h, stride_a: s * s, stride_b: d, stride_c: d }),
        ..Matmul::new(s, d, s).batched(b * h)
    };
    assert!(matmul::subgroup_reads_b_in_place(&pv) && !matmul::subgroup_reads_b_in_place(&op));
    for kernel in f32_kernels(gpu) {
        let scores = gpu.zeros("scores", &[b, h, s, s]).unwrap();
        let out = gpu.zeros("out", &[b, s, h, d]).unwrap();
        let mut rec = gpu.recorder();
        matmul::matmul_with(&mut rec, &q, &k, &scores, &op, Epilogue::None, kernel).unwrap();
        matmul::matmul_with(&mut rec, &p, &k, &out, &pv, Epilogue::None, kernel).unwrap();
        rec.submit().unwrap();
        let got = gpu.read::<f32>(&scores).unwrap();
        let got_out = gpu.read::<f32>(&out).unwrap();
        for (bi, hi) in (0..b).flat_map(|bi| (0..h).map(move |hi| (bi, hi))) {
            let want = reference::matmul::matmul(
                &head(&q_host, bi, hi),
                &head(&k_host, bi, hi),
                s,
                s,
                d,
                false,
                true,
            );
            let at = (bi * h + hi) * s * s;
            assert_close(&format!("{kernel:?} b{bi} h{hi}"), &got[at..][..s * s], &want, RTOL, ATOL);
            let p_head = &p_host[at..][..s * s];
            let want = reference::matmul::matmul(p_head, &head(&k_host, bi, hi), s, d, s, false, false);
            let out_head = head(&got_out, bi, hi);
            assert_close(&format!("P·V {kernel:?} b{bi} h{hi}"), &out_head, &want, RTOL, ATOL);
        }
    }
    // A batch that is not a whole number of outer batches is refused.
    let bad = Matmul { batch: b * h - 1, ..op };
    let scores = gpu.zeros("scores", &[b, h, s, s]).unwrap();
    let error = matmul::matmul(&mut gpu.recorder(), &q, &k, &scores, &bad, Epilogue::None).unwrap_err();
    assert!(error.to_string().contains("inner batches"), "{error}");
}

#[test]
fn results_are_bit_identical_across_runs() {
    let gpu = gpu();
    let (m, n, k) = (65, 130, 257);
    let a = gpu.upload("a", &[m, k], &random_vec(m * k, 13, 1.0)).unwrap();
    let b = gpu.upload("b", &[k, n], &random_vec(k * n, 14, 1.0)).unwrap();
    let run = || {
        let c = gpu.zeros("c", &[m, n]).unwrap();
        let mut rec = gpu.recorder();
        matmul::matmul(&mut rec, &a, &b, &c, &Matmul::new(m, n, k), Epilogue::None).unwrap();
        rec.submit().unwrap();
        gpu.read::<u32>(&c).unwrap()
    };
    assert_eq!(run(), run());
}

/// The matmul is built without naga's runtime bounds checks (it bounds its own indices):
/// the same bits as the checked build at shapes no tile divides, in every transpose form.
#[test]
fn trusted_build_matches_the_checked_one() {
    let gpu = gpu();
    assert!(!gpu.shader_checks(), "PALS_SHADER_CHECKS is set: the trusted build is not under test");
    for &(m, n, k) in SHAPES {
        let a = gpu.upload("a", &[m * k], &random_vec(m * k, 21, 1.0)).unwrap();
        let b = gpu.upload("b", &[k * n], &random_vec(k * n, 22, 1.0)).unwrap();
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let op = Matmul { trans_a, trans_b, ..Matmul::new(m, n, k) };
            let mut results = Vec::new();
            for checks in [false, true] {
                gpu.set_shader_checks(checks);
                let c = gpu.zeros("c", &[m, n]).unwrap();
                let mut rec = gpu.recorder();
                matmul::matmul(&mut rec, &a, &b, &c, &op, Epilogue::None).unwrap();
                rec.submit().unwrap();
                results.push(gpu.read::<f32>(&c).unwrap());
            }
            gpu.set_shader_checks(false);
            assert_eq!(results[0], results[1], "{m}x{n}x{k} ta={trans_a} tb={trans_b}");
        }
    }
}

#[test]
fn bad_shapes_and_oversized_tensors_are_errors() {
    let gpu = gpu();
    let a = gpu.zeros("a", &[4, 5]).unwrap();
    let b = gpu.zeros("b", &[5, 6]).unwrap();
    let c = gpu.zeros("small_c", &[4, 5]).unwrap();
    let mut rec = gpu.recorder();
    let error = matmul::matmul(&mut rec, &a, &b, &c, &Matmul::new(4, 6, 5), Epilogue::None).unwrap_err();
    assert!(matches!(error, GpuError::Shape { .. }) && error.to_string().contains("small_c"), "{error}");
    let bias = gpu.zeros("bias", &[5]).unwrap();
    let c = gpu.zeros("c", &[4, 6]).unwrap();
    let error =
        matmul::matmul(&mut rec, &a, &b, &c, &Matmul::new(4, 6, 5), Epilogue::Bias(&bias)).unwrap_err();
    assert!(error.to_string().contains("bias"), "{error}");

    let limit = gpu.max_tensor_bytes();
    let too_many = (limit / 4 + 1) as usize;
    let error = gpu.zeros("word_embeddings", &[too_many]).unwrap_err();
    assert!(matches!(error, GpuError::TooBig { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("word_embeddings") && message.contains(&limit.to_string()), "{message}");
}

#[test]
fn tuner_picks_a_usable_tile_and_remembers_it() {
    let gpu = gpu();
    let dir = std::env::temp_dir().join(format!("pals-tune-test-{}", std::process::id()));
    let cache = pals::gpu::TuneCache::at(dir.join("tune.json"));
    let candidates = vec!["slow".to_string(), "fast".to_string()];
    let chosen = cache.choose("k", &candidates, |name| if name == "fast" { 1.0 } else { 2.0 });
    assert_eq!(chosen, "fast");
    let reopened = pals::gpu::TuneCache::at(dir.join("tune.json"));
    assert_eq!(reopened.get("k").as_deref(), Some("fast"));
    let _ = std::fs::remove_dir_all(&dir);
    // And the real one on this adapter: a product through `matmul` is right whatever it picked.
    let (m, n, k) = (300, 200, 100);
    let a_host = random_vec(m * k, 15, 1.0);
    let b_host = random_vec(k * n, 16, 1.0);
    let a = gpu.upload("a", &[m, k], &a_host).unwrap();
    let b = gpu.upload("b", &[k, n], &b_host).unwrap();
    let c = gpu.zeros("c", &[m, n]).unwrap();
    let mut rec = gpu.recorder();
    matmul::matmul(&mut rec, &a, &b, &c, &Matmul::new(m, n, k), Epilogue::None).unwrap();
    rec.submit().unwrap();
    let want = reference::matmul::matmul(&a_host, &b_host, m, n, k, false, false);
    assert_close("tuned", &gpu.read::<f32>(&c).unwrap(), &want, RTOL, ATOL);
}

/// Storage types (A, B, C) the cooperative-matrix kernel is checked with: f32, mixed
/// precision's f16 weights and activations, and an f16 result.
const COOP_TYPES: [[ElementType; 3]; 4] = {
    use ElementType::{F16, F32};
    [[F32, F32, F32], [F32, F16, F32], [F16, F16, F32], [F16, F16, F16]]
};

/// The cooperative-matrix kernel's WGSL, for every transpose and storage type (the
/// epilogue is a parameter), parses and validates with the naga wgpu uses and translates
/// to SPIR-V 1.6: checked on every machine, including those (lavapipe) whose adapter
/// cannot run it.
#[test]
fn coop_kernel_validates_with_naga() {
    use wgpu::naga;
    let transposes = [(false, false), (true, false), (false, true), (true, true)];
    for ((trans_a, trans_b), types) in transposes.into_iter().flat_map(|t| COOP_TYPES.map(|types| (t, types)))
    {
        let op = Matmul { trans_a, trans_b, ..Matmul::new(64, 64, 64) };
        let source = matmul::coop_source(32, &op, types);
        let what = format!("ta={trans_a} tb={trans_b} {types:?}");
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&source)));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&source)));
        let options = naga::back::spv::Options { lang_version: (1, 6), ..Default::default() };
        let words = naga::back::spv::write_vec(&module, &info, &options, None)
            .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));
        assert!(words.len() > 100, "{what}: {} SPIR-V words", words.len());
    }
}

/// The cooperative-matrix path against the reference on the f16-rounded operands (so only
/// f32 accumulation order differs), at shapes that are not multiples of its 32-blocks or
/// 16-matrices. Where the adapter cannot run it, the test says so plainly and checks that
/// the kernel refuses with that reason instead of silently computing something else.
#[test]
fn coop_kernel_matches_reference_or_says_why_not() {
    let gpu = gpu();
    let a = gpu.zeros("a", &[16]).unwrap();
    if let Some(reason) = matmul::coop_unavailable(gpu) {
        eprintln!("cooperative-matrix path NOT run on this adapter: {reason}");
        let c = gpu.zeros("c", &[16]).unwrap();
        let mut rec = gpu.recorder();
        let error =
            matmul::matmul_coop(&mut rec, &a, &a, &c, &Matmul::new(4, 4, 4), Epilogue::None).unwrap_err();
        assert!(error.to_string().contains(&reason), "{error}");
        assert!(rec.is_empty());
        return;
    }
    eprintln!("cooperative-matrix path runs on {}", gpu.describe());
    for (m, n, k) in [(1, 1, 1), (33, 65, 17), (130, 70, 200)] {
        let a_host = round_f16(&random_vec(m * k, 31, 1.0));
        let b_host = round_f16(&random_vec(k * n, 32, 1.0));
        let bias_host = random_vec(n, 33, 1.0);
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            for [ta, tb, tc] in COOP_TYPES {
                let a_stored = if trans_a { transpose(&a_host, m, k) } else { a_host.clone() };
                let b_stored = if trans_b { transpose(&b_host, k, n) } else { b_host.clone() };
                let a = upload_as(gpu, "a", &a_stored, ta);
                let b = upload_as(gpu, "b", &b_stored, tb);
                let bias = gpu.upload("bias", &[n], &bias_host).unwrap();
                let op = Matmul { trans_a, trans_b, f16_operands: true, ..Matmul::new(m, n, k) };
                let product = reference::matmul::matmul(&a_host, &b_host, m, n, k, false, false);
                let biased: Vec<f32> =
                    product.iter().enumerate().map(|(i, v)| v + bias_host[i % n]).collect();
                let c_of = |name: &str, values: &[f32]| upload_as(gpu, name, values, tc);
                let zeros = vec![0.0; m * n];
                let (plain, with_bias, acc) = (c_of("c", &zeros), c_of("cb", &zeros), c_of("acc", &product));
                let mut rec = gpu.recorder();
                matmul::matmul_coop(&mut rec, &a, &b, &plain, &op, Epilogue::None).unwrap();
                matmul::matmul_coop(&mut rec, &a, &b, &with_bias, &op, Epilogue::Bias(&bias)).unwrap();
                matmul::matmul_coop(&mut rec, &a, &b, &acc, &op, Epilogue::Accumulate).unwrap();
                rec.submit().unwrap();
                let what = format!("coop {m}x{n}x{k} ta={trans_a} tb={trans_b} {ta:?}·{tb:?}→{tc:?}");
                let twice: Vec<f32> = product.iter().map(|v| 2.0 * v).collect();
                let tol = rtol(tc);
                assert_close(&what, &read_as_f32(gpu, &plain), &product, tol, ATOL);
                assert_close(&format!("{what} bias"), &read_as_f32(gpu, &with_bias), &biased, tol, ATOL);
                assert_close(&format!("{what} accumulate"), &read_as_f32(gpu, &acc), &twice, tol, ATOL);
            }
        }
    }
}

// An f16 C is the f32 sum rounded once: within one f16 ulp (2^-10 relative; WGSL allows
// either neighbour) of a value that is itself within RTOL of the reference.
const F16_RTOL: f32 = RTOL + 1.0 / 1024.0;

/// A tensor of `dtype` holding `values` (exact in f16 where they were rounded first).
fn upload_as(gpu: &Gpu, name: &str, values: &[f32], dtype: ElementType) -> Tensor {
    match dtype {
        ElementType::F32 => gpu.upload(name, &[values.len()], values).unwrap(),
        ElementType::F16 => gpu.upload_f16(name, &[values.len()], values).unwrap(),
    }
}

fn read_as_f32(gpu: &Gpu, tensor: &Tensor) -> Vec<f32> {
    match tensor.dtype {
        ElementType::F32 => gpu.read::<f32>(tensor).unwrap(),
        ElementType::F16 => gpu.read_f16(tensor).unwrap(),
    }
}

fn rtol(dtype: ElementType) -> f32 {
    if dtype == ElementType::F16 { F16_RTOL } else { RTOL }
}

/// A, B and C each f32 or f16 (mixed precision's storage): every combination on one tile
/// and the subgroup kernel, every transpose; every kernel with all three f16, untransposed
/// and both transposed
/// (each tile's transposed staging is the f32 test's; the f16 loads are one code path,
/// and each pipeline compile costs seconds on lavapipe). Against the reference on the
/// f16-rounded operands (so the GPU reads exactly the reference's values and only the f32
/// accumulation order and C's rounding differ).
#[test]
fn f16_storage_variants_match_reference() {
    use ElementType::{F16, F32};
    let gpu = gpu();
    let kernels = f32_kernels(gpu);
    // Every combination on the first tile and on the subgroup kernel (where it runs).
    let combined: Vec<Kernel> =
        kernels.iter().copied().filter(|&k| k == kernels[0] || k == Kernel::Subgroup).collect();
    let combinations = [
        (F16, F32, F32),
        (F32, F16, F32),
        (F16, F16, F32),
        (F32, F32, F16),
        (F16, F32, F16),
        (F32, F16, F16),
    ];
    for (m, n, k) in [(33, 65, 17), (130, 70, 200), (20, 36, 45)] {
        let a_host = round_f16(&random_vec(m * k, 41, 1.0));
        let b_host = round_f16(&random_vec(k * n, 42, 1.0));
        let want = reference::matmul::matmul(&a_host, &b_host, m, n, k, false, false);
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let a_stored = if trans_a { transpose(&a_host, m, k) } else { a_host.clone() };
            let b_stored = if trans_b { transpose(&b_host, k, n) } else { b_host.clone() };
            let op = Matmul { trans_a, trans_b, ..Matmul::new(m, n, k) };
            let every_kernel = if trans_a == trans_b { kernels.clone() } else { Vec::new() };
            let runs = combinations
                .iter()
                .flat_map(|&types| combined.iter().map(move |&kernel| (types, kernel)))
                .chain(every_kernel.into_iter().map(|kernel| ((F16, F16, F16), kernel)));
            for ((ta, tb, tc), kernel) in runs {
                let a = upload_as(gpu, "a", &a_stored, ta);
                let b = upload_as(gpu, "b", &b_stored, tb);
                let c = gpu.zeros_of("c", &[m, n], tc).unwrap();
                let mut rec = gpu.recorder();
                matmul::matmul_with(&mut rec, &a, &b, &c, &op, Epilogue::None, kernel).unwrap();
                rec.submit().unwrap();
                let what = format!("{m}x{n}x{k} ta={trans_a} tb={trans_b} {ta:?}·{tb:?}→{tc:?} {kernel:?}");
                assert_close(&what, &read_as_f32(gpu, &c), &want, rtol(tc), ATOL);
            }
        }
    }
}

/// The epilogues with an f16 C (and pre-activation), and `matmul` choosing a tiled kernel
/// for f16 storage.
#[test]
fn f16_epilogues_and_the_tuned_entry_point() {
    let gpu = gpu();
    let (m, n, k) = (37, 29, 41);
    let x_host = round_f16(&random_vec(m * k, 43, 1.0));
    let w_host = round_f16(&random_vec(n * k, 44, 0.5));
    let bias_host = random_vec(n, 45, 1.0);
    let x = gpu.upload_f16("x", &[m, k], &x_host).unwrap();
    let w = gpu.upload_f16("w", &[n, k], &w_host).unwrap();
    let bias = gpu.upload("bias", &[n], &bias_host).unwrap();
    let linear = reference::matmul::linear_forward(&x_host, &w_host, Some(&bias_host), m, n, k);
    let no_bias = reference::matmul::matmul(&x_host, &w_host, m, n, k, false, true);
    let op = Matmul::new(m, n, k).trans_b();
    let half = |name: &str| gpu.zeros_of(name, &[m, n], ElementType::F16).unwrap();
    let (y, gelu, pre, plain) = (half("y"), half("gelu"), half("pre"), half("plain"));
    let start = round_f16(&linear);
    let first = f32_kernels(gpu)[0];
    for kernel in f32_kernels(gpu).into_iter().filter(|&k| k == first || k == Kernel::Subgroup) {
        let acc = gpu.upload_f16("acc", &[m, n], &start).unwrap();
        let mut rec = gpu.recorder();
        matmul::matmul_with(&mut rec, &x, &w, &y, &op, Epilogue::Bias(&bias), kernel).unwrap();
        let fused = Epilogue::BiasGelu { bias: &bias, pre: &pre };
        matmul::matmul_with(&mut rec, &x, &w, &gelu, &op, fused, kernel).unwrap();
        matmul::matmul_with(&mut rec, &x, &w, &acc, &op, Epilogue::Accumulate, kernel).unwrap();
        matmul::matmul(&mut rec, &x, &w, &plain, &op, Epilogue::None).unwrap();
        rec.submit().unwrap();
        let what = |name: &str| format!("f16 {name} {kernel:?}");
        assert_close(&what("bias"), &gpu.read_f16(&y).unwrap(), &linear, F16_RTOL, ATOL);
        assert_close(&what("pre-activation"), &gpu.read_f16(&pre).unwrap(), &linear, F16_RTOL, ATOL);
        let want_gelu = reference::elementwise::gelu_forward(&linear);
        assert_close(&what("bias+gelu"), &gpu.read_f16(&gelu).unwrap(), &want_gelu, F16_RTOL, ATOL);
        let sum: Vec<f32> = start.iter().zip(&no_bias).map(|(a, b)| a + b).collect();
        assert_close(&what("accumulate"), &gpu.read_f16(&acc).unwrap(), &sum, F16_RTOL, ATOL);
        assert_close("f16 through matmul()", &gpu.read_f16(&plain).unwrap(), &no_bias, F16_RTOL, ATOL);

        // GELU backward from an f16 pre-activation into f16: the product stays f32 until
        // the one rounding of C.
        let pre_host = round_f16(&random_vec(m * n, 46, 3.0));
        let pre = gpu.upload_f16("f16 pre", &[m, n], &pre_host).unwrap();
        let d_pre = half("d_pre");
        let mut rec = gpu.recorder();
        let backward = Epilogue::GeluBackward { pre: &pre };
        matmul::matmul_with(&mut rec, &x, &w, &d_pre, &op, backward, kernel).unwrap();
        rec.submit().unwrap();
        let want = reference::elementwise::gelu_backward(&pre_host, &no_bias);
        assert_close(&what("gelu backward"), &gpu.read_f16(&d_pre).unwrap(), &want, F16_RTOL, ATOL);
    }

    let f32_pre = gpu.zeros("f32 pre", &[m, n]).unwrap();
    let f16_bias = gpu.upload_f16("f16 bias", &[n], &bias_host).unwrap();
    let mut rec = gpu.recorder();
    let mixed = Epilogue::BiasGelu { bias: &bias, pre: &f32_pre };
    let error = matmul::matmul_with(&mut rec, &x, &w, &gelu, &op, mixed, first).unwrap_err().to_string();
    assert!(error.contains("'f32 pre'"), "pre must have C's type: {error}");
    let error = matmul::matmul_with(&mut rec, &x, &w, &y, &op, Epilogue::Bias(&f16_bias), first)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'f16 bias'"), "bias is f32: {error}");
    assert!(rec.is_empty());
}
