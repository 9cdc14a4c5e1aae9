//! LayerNorm (with and without the fused residual add, and the fused dropout + residual +
//! LayerNorm) on the GPU against the CPU reference.
//! Tolerances: forward rtol 1e-5 / atol 1e-5, backward rtol 1e-4 / atol 1e-5 (dgamma and
//! dbeta sum M rows, so their atol grows as 1e-6 * M past 10 rows).

mod common;

use common::{assert_close, gpu};
use pals::gpu::Tensor;
use pals::kernels::elementwise::{self, DropoutSpec};
use pals::kernels::layernorm::{
    self, DropoutResidual, LayerNorm, LayerNormGrads, LayerNormScratch, LayerNormStats, backward_scratch_len,
};
use pals::reference::{self, random_vec};

const EPS: f32 = 1e-12;

/// With one column LayerNorm is degenerate (x̂ ≡ 0, dx ≡ 0) and any rounding in dx is
/// amplified by 1/√eps = 1e6; GPUs that contract a·b − c into an FMA (NVIDIA does) then
/// give |dx| ~ 1e-2. Such a row tests the plumbing, so it uses a well-conditioned eps.
fn eps_for(n: usize) -> f32 {
    if n == 1 { 1e-5 } else { EPS }
}

/// (M, N): tiny, N not a multiple of 256, M not a multiple of the 8-row backward block.
const SHAPES: &[(usize, usize)] = &[(1, 1), (1, 2), (7, 204), (300, 769), (5, 383), (3, 768)];
/// The adapter's own row width, and the CPU adapters' and the widest GPU one forced, so
/// both policies are checked wherever the tests run.
const WIDTHS: [Option<u32>; 3] = [None, Some(8), Some(256)];

struct Outputs {
    y: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

struct Inputs {
    x: Vec<f32>,
    residual: Option<Vec<f32>>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    dy: Vec<f32>,
}

fn inputs(m: usize, n: usize, with_residual: bool, seed: u32) -> Inputs {
    // An offset mean checks the two-pass variance.
    let x = random_vec(m * n, seed, 2.0).iter().map(|v| v + 3.0).collect();
    Inputs {
        x,
        residual: with_residual.then(|| random_vec(m * n, seed + 1, 1.0)),
        gamma: random_vec(n, seed + 2, 0.5).iter().map(|g| 1.0 + g).collect(),
        beta: random_vec(n, seed + 3, 0.5),
        dy: random_vec(m * n, seed + 4, 1.0),
    }
}

fn run(m: usize, n: usize, input: &Inputs, width: Option<u32>) -> Outputs {
    let gpu = gpu();
    let x = gpu.upload("x", &[m, n], &input.x).unwrap();
    let residual: Option<Tensor> =
        input.residual.as_ref().map(|r| gpu.upload("residual", &[m, n], r).unwrap());
    let gamma = gpu.upload("gamma", &[n], &input.gamma).unwrap();
    let beta = gpu.upload("beta", &[n], &input.beta).unwrap();
    let dy = gpu.upload("dy", &[m, n], &input.dy).unwrap();
    let [y, dx] = ["y", "dx"].map(|name| gpu.zeros(name, &[m, n]).unwrap());
    let [mean, rstd] = ["mean", "rstd"].map(|name| gpu.zeros(name, &[m]).unwrap());
    let [dgamma, dbeta] = ["dgamma", "dbeta"].map(|name| gpu.zeros(name, &[n]).unwrap());
    let ln = LayerNorm { width, ..LayerNorm::new(&gamma, &beta, eps_for(n)) };
    let stats = LayerNormStats { mean: &mean, rstd: &rstd };
    let grads = LayerNormGrads { dx: &dx, dgamma: &dgamma, dbeta: &dbeta };
    let mut rec = gpu.recorder();
    layernorm::layernorm_forward(&mut rec, &ln, &x, residual.as_ref(), &y, &stats).unwrap();
    layernorm::layernorm_backward(&mut rec, &ln, &x, residual.as_ref(), &stats, &dy, &grads).unwrap();
    rec.submit().unwrap();
    let read = |t: &Tensor| gpu.read::<f32>(t).unwrap();
    Outputs {
        y: read(&y),
        mean: read(&mean),
        rstd: read(&rstd),
        dx: read(&dx),
        dgamma: read(&dgamma),
        dbeta: read(&dbeta),
    }
}

#[test]
fn forward_and_backward_match_reference() {
    for (&(m, n), width) in SHAPES.iter().flat_map(|s| WIDTHS.map(|w| (s, w))) {
        for with_residual in [false, true] {
            let input = inputs(m, n, with_residual, 10);
            let got = run(m, n, &input, width);
            let residual = input.residual.as_deref();
            let what = |name: &str| format!("{name} {m}x{n} residual={with_residual} width {width:?}");
            let (y, mean, rstd) = reference::layernorm::layernorm_forward(
                &input.x,
                residual,
                &input.gamma,
                &input.beta,
                eps_for(n),
            );
            assert_close(&what("y"), &got.y, &y, 1e-5, 1e-5);
            assert_close(&what("mean"), &got.mean, &mean, 1e-5, 1e-5);
            assert_close(&what("rstd"), &got.rstd, &rstd, 1e-5, 1e-5);
            let (dx, dgamma, dbeta) = reference::layernorm::layernorm_backward(
                &input.x,
                residual,
                &input.gamma,
                &input.dy,
                eps_for(n),
            );
            let sum_atol = 1e-6 * (m as f32).max(10.0);
            assert_close(&what("dx"), &got.dx, &dx, 1e-4, 1e-5);
            assert_close(&what("dgamma"), &got.dgamma, &dgamma, 1e-4, sum_atol);
            assert_close(&what("dbeta"), &got.dbeta, &dbeta, 1e-4, sum_atol);
        }
    }
}

/// The fused kernels' outputs, and the gradient of x before dropout.
struct FusedOutputs {
    ln: Outputs,
    d_input: Vec<f32>,
}

/// A fused case's tensors on the device: x (as given: before or after dropout), the
/// residual, gamma, beta and dy uploaded, the outputs zeroed.
struct FusedTensors {
    x: Tensor,
    residual: Tensor,
    gamma: Tensor,
    beta: Tensor,
    dy: Tensor,
    /// y, dx, d_input
    out: [Tensor; 3],
    /// mean, rstd
    stats: [Tensor; 2],
    /// dgamma, dbeta
    params: [Tensor; 2],
    partials: Tensor,
}

impl FusedTensors {
    fn new(m: usize, n: usize, x: &[f32], input: &Inputs) -> FusedTensors {
        let gpu = gpu();
        FusedTensors {
            x: gpu.upload("x", &[m, n], x).unwrap(),
            residual: gpu.upload("residual", &[m, n], input.residual.as_ref().unwrap()).unwrap(),
            gamma: gpu.upload("gamma", &[n], &input.gamma).unwrap(),
            beta: gpu.upload("beta", &[n], &input.beta).unwrap(),
            dy: gpu.upload("dy", &[m, n], &input.dy).unwrap(),
            out: ["y", "dx", "d_input"].map(|name| gpu.zeros(name, &[m, n]).unwrap()),
            stats: ["mean", "rstd"].map(|name| gpu.zeros(name, &[m]).unwrap()),
            params: ["dgamma", "dbeta"].map(|name| gpu.zeros(name, &[n]).unwrap()),
            partials: gpu.zeros("partials", &[backward_scratch_len(m, n).0]).unwrap(),
        }
    }

    fn layernorm(&self, n: usize, width: Option<u32>) -> LayerNorm<'_> {
        LayerNorm { width, ..LayerNorm::new(&self.gamma, &self.beta, eps_for(n)) }
    }

    fn ln_stats(&self) -> LayerNormStats<'_> {
        LayerNormStats { mean: &self.stats[0], rstd: &self.stats[1] }
    }

    fn grads(&self) -> LayerNormGrads<'_> {
        LayerNormGrads { dx: &self.out[1], dgamma: &self.params[0], dbeta: &self.params[1] }
    }

    fn scratch(&self) -> LayerNormScratch<'_> {
        LayerNormScratch { partials: &self.partials, colsum: None }
    }

    fn read(&self) -> FusedOutputs {
        let read = |t: &Tensor| gpu().read::<f32>(t).unwrap();
        let ([y, dx, d_input], [mean, rstd], [dgamma, dbeta]) = (&self.out, &self.stats, &self.params);
        let ln = Outputs {
            y: read(y),
            mean: read(mean),
            rstd: read(rstd),
            dx: read(dx),
            dgamma: read(dgamma),
            dbeta: read(dbeta),
        };
        FusedOutputs { ln, d_input: read(d_input) }
    }
}

fn run_fused(m: usize, n: usize, input: &Inputs, dropout: DropoutSpec, width: Option<u32>) -> FusedOutputs {
    let t = FusedTensors::new(m, n, &input.x, input);
    let (ln, stats, grads, scratch) = (t.layernorm(n, width), t.ln_stats(), t.grads(), t.scratch());
    let fused = DropoutResidual { x: &t.x, dropout, residual: &t.residual };
    let mut rec = gpu().recorder();
    layernorm::dropout_residual_layernorm_forward(&mut rec, &ln, &fused, &t.out[0], &stats).unwrap();
    layernorm::dropout_residual_layernorm_backward(
        &mut rec, &ln, &fused, &stats, &t.dy, &grads, &t.out[2], &scratch,
    )
    .unwrap();
    rec.submit().unwrap();
    t.read()
}

/// LN(Dropout(x) + residual) in one kernel each way, at the shapes above and drop
/// probabilities 0 (a plain residual LayerNorm), 0.1 (BERT's) and 0.5.
#[test]
fn fused_dropout_residual_layernorm_matches_reference() {
    for (&(m, n), width) in SHAPES.iter().flat_map(|s| WIDTHS.map(|w| (s, w))) {
        // Shard 2: a data-parallel rank's slice, whose mask indices start at 2·m·n.
        for (p, shard) in [(0.0, 0), (0.1, 0), (0.5, 0), (0.5, 2)] {
            let input = inputs(m, n, true, 40);
            let dropout = DropoutSpec { p, seed: 17, stream: 3 + m as u32, shard };
            let got = run_fused(m, n, &input, dropout, width);
            let residual = input.residual.as_deref().unwrap();
            let what = |name: &str| format!("fused {name} {m}x{n} p={p} shard {shard} width {width:?}");
            let (y, mean, rstd) = reference::layernorm::dropout_residual_layernorm_forward(
                &input.x,
                dropout,
                residual,
                &input.gamma,
                &input.beta,
                eps_for(n),
            );
            assert_close(&what("y"), &got.ln.y, &y, 1e-5, 1e-5);
            assert_close(&what("mean"), &got.ln.mean, &mean, 1e-5, 1e-5);
            assert_close(&what("rstd"), &got.ln.rstd, &rstd, 1e-5, 1e-5);
            let got_grads = [&got.ln.dx, &got.d_input, &got.ln.dgamma, &got.ln.dbeta];
            check_dropout_backward(&what, (m, n), &input, dropout, got_grads.map(|v| v.as_slice()));
            if p > 0.0 && m * n >= 100 {
                let zeros = got.d_input.iter().filter(|&&v| v == 0.0).count();
                assert!(zeros > 0, "{}: nothing dropped", what("dx"));
            }
        }
    }
}

/// The gradients of LN(Dropout(x) + residual) — of s (the residual's), of x before
/// dropout, of gamma and beta — against the reference.
fn check_dropout_backward(
    what: &dyn Fn(&str) -> String,
    (m, n): (usize, usize),
    input: &Inputs,
    dropout: DropoutSpec,
    [ds, dx, dgamma, dbeta]: [&[f32]; 4],
) {
    let residual = input.residual.as_deref().unwrap();
    let eps = eps_for(n);
    let (want_ds, want_dx, want_dgamma, want_dbeta) =
        reference::layernorm::dropout_residual_layernorm_backward(
            &input.x,
            dropout,
            residual,
            &input.gamma,
            &input.dy,
            eps,
        );
    let sum_atol = 1e-6 * (m as f32).max(10.0);
    assert_close(&what("d residual"), ds, &want_ds, 1e-4, 1e-5);
    assert_close(&what("dx"), dx, &want_dx, 1e-4, 1e-5);
    assert_close(&what("dgamma"), dgamma, &want_dgamma, 1e-4, sum_atol);
    assert_close(&what("dbeta"), dbeta, &want_dbeta, 1e-4, sum_atol);
}

/// LN(x + residual) where x was stored already dropped (the matmul's dropout epilogue),
/// its backward also writing the gradient before dropout: the same as the fused reference,
/// and that gradient bit for bit what the separate dropout pass gives (what the model did
/// before).
#[test]
fn backward_through_stored_dropout_matches_reference() {
    let gpu = gpu();
    for (&(m, n), width) in SHAPES.iter().flat_map(|s| WIDTHS.map(|w| (s, w))) {
        for (p, shard) in [(0.1, 0), (0.5, 2)] {
            let input = inputs(m, n, true, 50);
            let dropout = DropoutSpec { p, seed: 23, stream: 5 + m as u32, shard };
            let stored = reference::elementwise::dropout(&input.x, &dropout);
            let t = FusedTensors::new(m, n, &stored, &input);
            let (ln, stats, grads, scratch) = (t.layernorm(n, width), t.ln_stats(), t.grads(), t.scratch());
            let [y, dx, d_input] = &t.out;
            let separate = gpu.zeros("separate", &[m, n]).unwrap();
            let mut rec = gpu.recorder();
            layernorm::layernorm_forward(&mut rec, &ln, &t.x, Some(&t.residual), y, &stats).unwrap();
            #[rustfmt::skip]
            layernorm::residual_layernorm_backward(
                &mut rec, &ln, (&t.x, &t.residual), &stats, &t.dy, &grads, Some((dropout, d_input)), &scratch,
            )
            .unwrap();
            elementwise::dropout(&mut rec, dx, &separate, dropout).unwrap();
            rec.submit().unwrap();
            let read = |t: &Tensor| gpu.read::<f32>(t).unwrap();
            let what =
                |name: &str| format!("stored-dropout {name} {m}x{n} p={p} shard {shard} width {width:?}");
            let got = t.read();
            let got_grads = [&got.ln.dx, &got.d_input, &got.ln.dgamma, &got.ln.dbeta];
            check_dropout_backward(&what, (m, n), &input, dropout, got_grads.map(|v| v.as_slice()));
            let bits = |t: &Tensor| read(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(d_input), bits(&separate), "{}", what("dx against the separate dropout pass"));
        }
    }
}

#[test]
fn fused_shapes_are_checked() {
    let gpu = gpu();
    let [x, y, d_input] = ["x", "y", "d_input"].map(|name| gpu.zeros(name, &[4, 10]).unwrap());
    let residual = gpu.zeros("residual", &[4, 11]).unwrap();
    let short = gpu.zeros("short d_input", &[4, 9]).unwrap();
    let gamma = gpu.zeros("gamma", &[10]).unwrap();
    let [mean, rstd] = ["mean", "rstd"].map(|name| gpu.zeros(name, &[4]).unwrap());
    let partials = gpu.zeros("partials", &[backward_scratch_len(4, 10).0]).unwrap();
    let stats = LayerNormStats { mean: &mean, rstd: &rstd };
    let ln = LayerNorm::new(&gamma, &gamma, EPS);
    let dropout = DropoutSpec { p: 0.1, seed: 1, stream: 2, shard: 0 };
    let mut rec = gpu.recorder();
    let bad = DropoutResidual { x: &x, dropout, residual: &residual };
    let error = layernorm::dropout_residual_layernorm_forward(&mut rec, &ln, &bad, &y, &stats)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'residual'") && error.contains("[4, 11]"), "{error}");
    let good = DropoutResidual { x: &x, dropout, residual: &y };
    let grads = LayerNormGrads { dx: &d_input, dgamma: &gamma, dbeta: &mean };
    let scratch = LayerNormScratch { partials: &partials, colsum: None };
    let error = layernorm::dropout_residual_layernorm_backward(
        &mut rec, &ln, &good, &stats, &y, &grads, &short, &scratch,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("'mean'"), "{error}");
    let grads = LayerNormGrads { dbeta: &gamma, ..grads };
    let error = layernorm::dropout_residual_layernorm_backward(
        &mut rec, &ln, &good, &stats, &y, &grads, &short, &scratch,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("'short d_input'"), "{error}");
    // The stored-dropout backward: a short d_input, a residual of another shape.
    for (residual, d_input, named) in [(&y, &short, "'short d_input'"), (&residual, &d_input, "'residual'")] {
        #[rustfmt::skip]
        let error = layernorm::residual_layernorm_backward(
            &mut rec, &ln, (&x, residual), &stats, &y, &grads, Some((dropout, d_input)), &scratch,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains(named), "stored-dropout backward: {error}");
    }
    assert!(rec.is_empty(), "nothing is recorded on a shape error");
}

#[test]
fn results_are_bit_identical_twice() {
    let (m, n) = (300, 383);
    let input = inputs(m, n, true, 20);
    let first = run(m, n, &input, None);
    let second = run(m, n, &input, None);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for (name, a, b) in [
        ("y", &first.y, &second.y),
        ("dx", &first.dx, &second.dx),
        ("dgamma", &first.dgamma, &second.dgamma),
        ("dbeta", &first.dbeta, &second.dbeta),
    ] {
        assert_eq!(bits(a), bits(b), "{name} differs between runs");
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let gpu = gpu();
    let x = gpu.zeros("x", &[4, 10]).unwrap();
    let residual = gpu.zeros("residual", &[4, 11]).unwrap();
    let y = gpu.zeros("y", &[4, 10]).unwrap();
    let gamma = gpu.zeros("gamma", &[10]).unwrap();
    let short = gpu.zeros("short beta", &[9]).unwrap();
    let mean = gpu.zeros("mean", &[4]).unwrap();
    let rstd = gpu.zeros("rstd", &[4]).unwrap();
    let stats = LayerNormStats { mean: &mean, rstd: &rstd };
    let good = LayerNorm::new(&gamma, &gamma, EPS);
    let bad = LayerNorm { beta: &short, ..good };
    let mut rec = gpu.recorder();
    let error = layernorm::layernorm_forward(&mut rec, &bad, &x, None, &y, &stats).unwrap_err().to_string();
    let odd = LayerNorm { width: Some(3), ..good };
    let odd_error =
        layernorm::layernorm_forward(&mut rec, &odd, &x, None, &y, &stats).unwrap_err().to_string();
    assert!(odd_error.contains("3 invocations per row"), "{odd_error}");
    assert!(error.contains("'short beta'"), "{error}");
    let error = layernorm::layernorm_forward(&mut rec, &good, &x, Some(&residual), &y, &stats)
        .unwrap_err()
        .to_string();
    assert!(error.contains("'residual'") && error.contains("[4, 11]"), "{error}");
    let grads = LayerNormGrads { dx: &y, dgamma: &gamma, dbeta: &mean };
    let error =
        layernorm::layernorm_backward(&mut rec, &good, &x, None, &stats, &y, &grads).unwrap_err().to_string();
    assert!(error.contains("'mean'"), "{error}");
}

/// GPU time at BERT-base shape; run on a real GPU with `--ignored --nocapture`.
#[test]
#[ignore]
fn layernorm_timing() {
    let gpu = gpu();
    let (m, n) = (4096, 768);
    let input = inputs(m, n, true, 30);
    let x = gpu.upload("x", &[m, n], &input.x).unwrap();
    let residual = gpu.upload("residual", &[m, n], input.residual.as_ref().unwrap()).unwrap();
    let gamma = gpu.upload("gamma", &[n], &input.gamma).unwrap();
    let dy = gpu.upload("dy", &[m, n], &input.dy).unwrap();
    let [y, dx] = ["y", "dx"].map(|name| gpu.zeros(name, &[m, n]).unwrap());
    let [mean, rstd] = ["mean", "rstd"].map(|name| gpu.zeros(name, &[m]).unwrap());
    let [dgamma, dbeta] = ["dgamma", "dbeta"].map(|name| gpu.zeros(name, &[n]).unwrap());
    let ln = LayerNorm::new(&gamma, &gamma, EPS);
    let stats = LayerNormStats { mean: &mean, rstd: &rstd };
    let grads = LayerNormGrads { dx: &dx, dgamma: &dgamma, dbeta: &dbeta };
    for _ in 0..3 {
        let mut rec = gpu.recorder();
        layernorm::layernorm_forward(&mut rec, &ln, &x, Some(&residual), &y, &stats).unwrap();
        layernorm::layernorm_backward(&mut rec, &ln, &x, Some(&residual), &stats, &dy, &grads).unwrap();
        for t in rec.submit_timed().unwrap() {
            eprintln!("layernorm {m}x{n}: {} {:.1} us", t.label, t.nanos / 1e3);
        }
    }
}
