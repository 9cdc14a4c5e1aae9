//! `pals bench --train` on a tiny model through the same code path, and the runtime's
//! reuse of its dispatch-parameter and readback buffers. Each test opens its own device:
//! the counters are per device, and tests run in parallel.

use pals::bench::{FAMILIES, TrainBench, kernel_family, train_bench};
use pals::gpu::{Gpu, Timing};
use pals::kernels::elementwise::{self, DropoutSpec};
use pals::model::BertConfig;
use pals::model::tasks::MethodName;
use pals::train::trainer::Precision;

fn gpu() -> Gpu {
    Gpu::from_env().unwrap_or_else(|error| panic!("GPU tests need a GPU adapter: {error}"))
}

/// The no-allocation target is a real check here: counts, not timings.
#[test]
fn warm_training_steps_create_no_buffers() {
    let gpu = gpu();
    let bench = TrainBench {
        config: BertConfig::tiny(2, 32, 4),
        method: MethodName::Pals,
        batch: 4,
        seq: 8,
        steps: 2,
        precision: Precision::F32,
    };
    let report = train_bench(&gpu, &bench).unwrap();
    let lines = report.lines();
    eprintln!("{}", lines.join("\n"));
    assert!(report.step_seconds > 0.0);
    assert!(report.dispatches_per_step > 0);
    assert_eq!(report.submits_per_step, 1.0, "one submit per training step");
    assert_eq!(report.timed_buffers, 0, "buffers created during the timed steps");
    assert!(report.warmup_buffers[0] > 0, "the first step allocates its buffers");
    assert_eq!(report.warmup_buffers[1], 0, "nothing is allocated after the first step");
    assert!(report.warmup_bind_groups[0] > 0, "the first step makes its bind groups");
    assert_eq!(report.warmup_bind_groups[1], 0, "bind groups are cached after the first step");
    assert_eq!(report.timed_bind_groups, 0, "bind groups created during the timed steps");
    assert!(report.host_seconds > 0.0 && report.host_seconds < report.step_seconds);
    assert!(report.encoding_seconds > 0.0 && report.encoding_seconds < report.host_seconds);
    assert!(lines.iter().any(|l| l.starts_with("host time per step:")));
    // The first step compiles what the step runs (the device opened in this test process,
    // so every one of its pipelines was compiled here).
    assert!(report.pipelines > 0 && report.first_step_seconds > 0.0, "{} pipelines", report.pipelines);
    assert!(lines.iter().any(|l| l.starts_with("first warm-up step:")));
    assert_eq!(report.padded_seq, 8);
    if gpu.has(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES) {
        assert_eq!(report.families.len(), FAMILIES.len());
        assert!(report.matmul_share().is_some_and(|s| s > 0.0 && s < 1.0));
        assert!(lines.iter().any(|l| l.starts_with("matmul share")));
        // Every dispatch of the timestamped step is in one label's count, slowest first.
        let counted: usize = report.kernels.iter().map(|k| k.2).sum();
        assert_eq!(counted, report.dispatches_per_step, "{:?}", report.kernels);
        assert!(report.kernels.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lines.iter().any(|l| l.starts_with("slowest kernels")));
    }
    assert!(lines.iter().any(|l| l.contains("task-specific")));
}

#[test]
fn a_sequence_longer_than_the_positions_is_refused() {
    let gpu = gpu();
    let config = BertConfig::tiny(1, 32, 4); // 64 positions
    let bench = TrainBench {
        config,
        method: MethodName::Pals,
        batch: 1,
        seq: 65,
        steps: 1,
        precision: Precision::F32,
    };
    let error = train_bench(&gpu, &bench).expect_err("seq 65 > 64 positions");
    assert!(error.to_string().contains("positions"), "{error}");
}

#[test]
fn every_kernel_of_a_step_has_its_family() {
    let named = ["matmul", "attention_backward_dq", "layernorm_forward", "gelu_backward", "dropout"];
    let families: Vec<&str> = named.iter().map(|n| kernel_family(n)).collect();
    assert_eq!(families, ["matmul", "attention", "layernorm", "elementwise", "elementwise"]);
    for kernel in ["matmul_subgroup", "matmul_pack", "matmul_coop"] {
        assert_eq!(kernel_family(kernel), "matmul", "{kernel}");
    }
    assert_eq!(kernel_family("adam_step"), "optimizer");
    assert_eq!(kernel_family("sum_squares_partial"), "optimizer");
    assert_eq!(kernel_family("colsum"), "reduce");
    // The unfused attention path labels its products on the batched matmul so.
    assert_eq!(kernel_family("attention_products"), "attention");
    assert_eq!(kernel_family("something_new"), "other");
    let timings = [
        Timing { label: "matmul", nanos: 3.0 },
        Timing { label: "colsum", nanos: 1.0 },
        Timing { label: "matmul", nanos: 2.0 },
    ];
    let times = pals::bench::family_times(&timings);
    assert_eq!(times.len(), FAMILIES.len());
    assert_eq!(times[0], ("matmul", 5.0));
    assert!(times.contains(&("reduce", 1.0)));
}

/// Submits reuse one parameter buffer: a second submit creates nothing, and overwriting
/// the parameters for submit B before submit A has run does not change A's result.
#[test]
fn submits_reuse_the_params_buffer_in_order() {
    let gpu = gpu();
    let n = 1000;
    let x = gpu.upload("x", &[n], &vec![1.0f32; n]).unwrap();
    let kept = gpu.zeros("kept", &[n]).unwrap();
    let dropped = gpu.zeros("dropped", &[n]).unwrap();
    let copy = |out, p| {
        let mut rec = gpu.recorder();
        elementwise::dropout(&mut rec, &x, out, DropoutSpec { p, seed: 3, stream: 4, shard: 0 }).unwrap();
        rec.submit().unwrap();
    };
    copy(&kept, 0.0); // the params buffer is made here
    let buffers = gpu.buffers_created();
    let submits = gpu.submits();
    // No wait in between: submit B's parameters are written while A may still be queued.
    copy(&kept, 0.0);
    copy(&dropped, 0.9);
    assert_eq!(gpu.buffers_created() - buffers, 0, "the params buffer is reused");
    assert_eq!(gpu.submits() - submits, 2);
    let host_kept = gpu.read::<f32>(&kept).unwrap();
    assert!(host_kept.iter().all(|&v| v == 1.0), "submit A saw submit B's dropout rate");
    let host_dropped = gpu.read::<f32>(&dropped).unwrap();
    let zeros = host_dropped.iter().filter(|&&v| v == 0.0).count();
    assert!(zeros > n / 2, "p = 0.9 dropped only {zeros} of {n}");

    // A submit needing more parameter space than there is grows the buffer once.
    let mut rec = gpu.recorder();
    for _ in 0..200 {
        elementwise::dropout(&mut rec, &x, &dropped, DropoutSpec::NONE).unwrap();
    }
    let buffers = gpu.buffers_created();
    rec.submit().unwrap();
    assert_eq!(gpu.buffers_created() - buffers, 1, "grown once");
    assert!(gpu.read::<f32>(&dropped).unwrap().iter().all(|&v| v == 1.0));
}

/// Reads of the same size reuse one staging buffer, unmapped in between.
#[test]
fn readback_reuses_its_staging_buffer() {
    let gpu = gpu();
    let a = gpu.upload("a", &[3], &[1.0f32, 2.0, 3.0]).unwrap();
    let b = gpu.upload("b", &[3], &[4.0f32, 5.0, 6.0]).unwrap();
    let c = gpu.upload("c", &[5], &[7u32, 8, 9, 10, 11]).unwrap();
    assert_eq!(gpu.read::<f32>(&a).unwrap(), [1.0, 2.0, 3.0]);
    let buffers = gpu.buffers_created();
    assert_eq!(gpu.read::<f32>(&b).unwrap(), [4.0, 5.0, 6.0]);
    assert_eq!(gpu.read::<f32>(&a).unwrap(), [1.0, 2.0, 3.0]);
    assert_eq!(gpu.buffers_created() - buffers, 0, "same size: the staging buffer is reused");
    assert_eq!(gpu.read::<u32>(&c).unwrap(), [7, 8, 9, 10, 11]);
    assert_eq!(gpu.buffers_created() - buffers, 1, "another size: one new staging buffer");
    gpu.write(&b, &[0.5f32, 0.25, 0.125]).unwrap();
    assert_eq!(gpu.read::<f32>(&b).unwrap(), [0.5, 0.25, 0.125]);
    assert_eq!(gpu.buffers_created() - buffers, 1);
}

/// The same dispatch over the same tensors reuses its bind group; other tensors get their
/// own; a dropped tensor's bind groups leave the cache at the next submit.
#[test]
fn bind_groups_are_reused_and_dropped_with_their_tensors() {
    let gpu = gpu();
    let n = 300;
    let x = gpu.upload("x", &[n], &vec![2.0f32; n]).unwrap();
    let y = gpu.zeros("y", &[n]).unwrap();
    let copy = |from: &pals::gpu::Tensor, to: &pals::gpu::Tensor| {
        let mut rec = gpu.recorder();
        elementwise::dropout(&mut rec, from, to, DropoutSpec { p: 0.0, seed: 0, stream: 0, shard: 0 })
            .unwrap();
        rec.submit().unwrap();
    };
    copy(&x, &y);
    let (made, cached) = (gpu.bind_groups_created(), gpu.bind_groups_cached());
    copy(&x, &y);
    copy(&x.view(&[n / 2]), &y.view(&[n / 2])); // views bind the same buffers
    assert_eq!(gpu.bind_groups_created() - made, 0, "same pipeline and buffers: reused");
    {
        let z = gpu.zeros("z", &[n]).unwrap();
        copy(&x, &z);
        assert_eq!(gpu.bind_groups_created() - made, 1, "another buffer: a new bind group");
        assert_eq!(gpu.bind_groups_cached(), cached + 1);
        assert_eq!(gpu.read::<f32>(&z).unwrap(), vec![2.0; n]);
    }
    copy(&x, &y); // the next submit drops z's entry
    assert_eq!(gpu.bind_groups_cached(), cached, "z's bind group left with z");
    assert_eq!(gpu.bind_groups_created() - made, 1);
}

/// A copy between dispatches sees the dispatch before it and is seen by the one after;
/// a timed submit still returns one timing per dispatch.
#[test]
fn copies_are_ordered_between_dispatches() {
    let gpu = gpu();
    let x = gpu.upload("x", &[4], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let doubled = gpu.zeros("doubled", &[4]).unwrap();
    let ring = gpu.zeros("ring", &[6]).unwrap();
    let out = gpu.zeros("out", &[6]).unwrap();
    let keep_all = DropoutSpec { p: 0.0, seed: 0, stream: 0, shard: 0 };
    let mut rec = gpu.recorder();
    elementwise::add(&mut rec, &x, &x, &doubled).unwrap(); // [2, 4, 6, 8]
    rec.copy(&doubled, 1, &ring, 3, 2).unwrap(); // ring [0, 0, 0, 4, 6, 0]
    elementwise::dropout(&mut rec, &ring, &out, keep_all).unwrap();
    assert_eq!(rec.len(), 2, "copies are not dispatches");
    let timings = rec.submit_timed().unwrap();
    if gpu.has(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES) {
        let labels: Vec<&str> = timings.iter().map(|t| t.label).collect();
        assert_eq!(labels, ["add", "dropout"]);
    }
    assert_eq!(gpu.read::<f32>(&out).unwrap(), [0.0, 0.0, 0.0, 4.0, 6.0, 0.0]);

    let mut rec = gpu.recorder();
    let error = rec.copy(&doubled, 3, &ring, 0, 2).unwrap_err().to_string();
    assert!(error.contains("'doubled'") && error.contains("past an end"), "{error}");
    let error = rec.copy(&ring, 0, &ring, 3, 3).unwrap_err().to_string();
    assert!(error.contains("one buffer"), "{error}");
    assert!(rec.is_empty());
}

/// `pals bench` prices naga's bounds checks on the matmul in the same run, and leaves the
/// device's setting as it found it.
#[test]
fn bounds_check_cost_is_measured_both_ways() {
    let gpu = gpu();
    let line = pals::bench::bounds_check_cost(&gpu, 1).unwrap();
    assert!(
        line.starts_with("bounds checks, ") && line.contains("with naga's") && line.contains("without"),
        "{line}"
    );
    assert!(!gpu.shader_checks());
}
