//! GELU, tanh, dropout and adds on the GPU against the CPU reference.
//! Tolerances: GELU and tanh rtol 1e-5 / atol 1e-6; dropout rtol 1e-6 with the mask exact;
//! adds exact (one f32 add per element is the correctly rounded sum).

mod common;

use common::{assert_close, gpu};
use pals::gpu::{ElementType, GpuError};
use pals::kernels::elementwise::{self, DropoutSpec};
use pals::reference::{self, random_vec};

const SIZES: &[usize] = &[1, 7, 256, 1000, 70_001];

#[test]
fn gelu_forward_and_backward_match_reference() {
    let gpu = gpu();
    for &n in SIZES {
        let x_host = random_vec(n, 1, 6.0);
        let dy_host = random_vec(n, 2, 1.0);
        let x = gpu.upload("x", &[n], &x_host).unwrap();
        let dy = gpu.upload("dy", &[n], &dy_host).unwrap();
        let y = gpu.zeros("y", &[n]).unwrap();
        let dx = gpu.zeros("dx", &[n]).unwrap();
        let mut rec = gpu.recorder();
        elementwise::gelu(&mut rec, &x, &y).unwrap();
        elementwise::gelu_backward(&mut rec, &x, &dy, &dx).unwrap();
        rec.submit().unwrap();
        let want_y = reference::elementwise::gelu_forward(&x_host);
        let want_dx = reference::elementwise::gelu_backward(&x_host, &dy_host);
        assert_close(&format!("gelu n={n}"), &gpu.read::<f32>(&y).unwrap(), &want_y, 1e-5, 1e-6);
        assert_close(&format!("gelu' n={n}"), &gpu.read::<f32>(&dx).unwrap(), &want_dx, 1e-5, 1e-6);
    }
}

#[test]
fn tanh_forward_and_backward_match_reference() {
    let gpu = gpu();
    for &n in SIZES {
        let mut x_host = random_vec(n, 3, 4.0);
        x_host[0] = 100.0; // must not overflow to NaN
        let dy_host = random_vec(n, 4, 1.0);
        let x = gpu.upload("x", &[n], &x_host).unwrap();
        let dy = gpu.upload("dy", &[n], &dy_host).unwrap();
        let y = gpu.zeros("y", &[n]).unwrap();
        let dx = gpu.zeros("dx", &[n]).unwrap();
        let mut rec = gpu.recorder();
        elementwise::tanh(&mut rec, &x, &y).unwrap();
        elementwise::tanh_backward(&mut rec, &y, &dy, &dx).unwrap();
        rec.submit().unwrap();
        let want_y = reference::elementwise::tanh_forward(&x_host);
        let got_y = gpu.read::<f32>(&y).unwrap();
        assert_close(&format!("tanh n={n}"), &got_y, &want_y, 1e-5, 1e-6);
        let want_dx = reference::elementwise::tanh_backward(&got_y, &dy_host);
        assert_close(&format!("tanh' n={n}"), &gpu.read::<f32>(&dx).unwrap(), &want_dx, 1e-5, 1e-6);
    }
}

#[test]
fn dropout_matches_reference_mask_exactly() {
    let gpu = gpu();
    for &n in SIZES {
        // Shard 3: the slice of a data-parallel rank, whose mask indices start at 3·n.
        for (p, shard) in [(0.0f32, 0), (0.1, 0), (0.5, 0), (0.5, 3)] {
            let spec = DropoutSpec { p, seed: 42, stream: 9, shard };
            let x_host = random_vec(n, 5, 1.0);
            let x = gpu.upload("x", &[n], &x_host).unwrap();
            let y = gpu.zeros("y", &[n]).unwrap();
            let mut rec = gpu.recorder();
            elementwise::dropout(&mut rec, &x, &y, spec).unwrap();
            rec.submit().unwrap();
            let got = gpu.read::<f32>(&y).unwrap();
            let want = reference::elementwise::dropout(&x_host, &spec);
            // The mask must agree bit for bit: every zero where the reference has one.
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(*g == 0.0, *w == 0.0, "dropout mask differs at {i} (n={n}, p={p}, shard {shard})");
            }
            assert_close(&format!("dropout n={n} p={p} shard {shard}"), &got, &want, 1e-6, 0.0);
        }
    }
}

/// Runs `add` (out = a + b) and `add_assign` (y += x, y starting as b) on the GPU.
fn gpu_adds(a: &[f32], b: &[f32]) -> (Vec<u32>, Vec<u32>) {
    let gpu = gpu();
    let n = a.len();
    let a_gpu = gpu.upload("a", &[n], a).unwrap();
    let b_gpu = gpu.upload("b", &[n], b).unwrap();
    let out = gpu.zeros("out", &[n]).unwrap();
    let y = gpu.upload("y", &[n], b).unwrap();
    let copied = gpu.zeros("copied", &[n]).unwrap();
    let mut rec = gpu.recorder();
    elementwise::add(&mut rec, &a_gpu, &b_gpu, &out).unwrap();
    elementwise::add_assign(&mut rec, &a_gpu, &y).unwrap();
    elementwise::copy(&mut rec, &a_gpu, &copied).unwrap();
    rec.submit().unwrap();
    let bits = |t| gpu.read::<f32>(t).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    assert_eq!(bits(&copied), a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "copy n={n}");
    (bits(&out), bits(&y))
}

#[test]
fn adds_match_reference_exactly() {
    for &n in SIZES {
        let a = random_vec(n, 6, 3.0);
        let b = random_vec(n, 7, 0.01);
        let want: Vec<u32> = reference::elementwise::add(&a, &b).iter().map(|v| v.to_bits()).collect();
        let (sum, accumulated) = gpu_adds(&a, &b);
        assert_eq!(sum, want, "add n={n}");
        assert_eq!(accumulated, want, "add_assign n={n}");
    }
}

#[test]
fn runs_are_bit_identical() {
    let gpu = gpu();
    let n = 70_001;
    let (a, b) = (random_vec(n, 8, 2.0), random_vec(n, 9, 2.0));
    assert_eq!(gpu_adds(&a, &b), gpu_adds(&a, &b));
    let run = || {
        let x = gpu.upload("x", &[n], &a).unwrap();
        let y = gpu.zeros("y", &[n]).unwrap();
        let z = gpu.zeros("z", &[n]).unwrap();
        let mut rec = gpu.recorder();
        elementwise::gelu(&mut rec, &x, &y).unwrap();
        elementwise::dropout(&mut rec, &y, &z, DropoutSpec { p: 0.1, seed: 3, stream: 4, shard: 0 }).unwrap();
        rec.submit().unwrap();
        gpu.read::<f32>(&z).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn mismatched_lengths_are_errors() {
    let gpu = gpu();
    let x = gpu.zeros("x", &[10]).unwrap();
    let y = gpu.zeros("y", &[11]).unwrap();
    let mut rec = gpu.recorder();
    let error = elementwise::gelu(&mut rec, &x, &y).unwrap_err().to_string();
    assert!(error.contains("'y'") && error.contains("[11]"), "{error}");
}

/// A tensor's element type travels with it: f16 data of odd length round-trips, reading
/// it as f32 is an error, and a kernel that writes only f32 (the column sum's output)
/// refuses it by name.
#[test]
fn element_types_are_checked() {
    let gpu = gpu();
    let half = gpu.zeros_of("half", &[3], ElementType::F16).unwrap();
    assert_eq!(half.bytes(), 6);
    gpu.write(&half, &[1u16, 2, 3]).unwrap();
    assert_eq!(gpu.read::<u16>(&half).unwrap(), vec![1, 2, 3]);
    assert!(gpu.read::<f32>(&half).is_err());
    assert!(gpu.write(&half, &[1.0f32, 2.0, 3.0]).is_err());
    let y = gpu.zeros("y", &[3]).unwrap();
    let mut rec = gpu.recorder();
    let error = pals::kernels::reduce::colsum(&mut rec, &y, &half, false).unwrap_err().to_string();
    assert!(error.contains("'half'") && error.contains("F16"), "{error}");
}

#[test]
fn bad_adds_are_shape_errors() {
    let gpu = gpu();
    let x = gpu.zeros("x", &[10]).unwrap();
    let y = gpu.zeros("y", &[11]).unwrap();
    let mut rec = gpu.recorder();
    let error = elementwise::add_assign(&mut rec, &x, &y).unwrap_err();
    assert!(matches!(error, GpuError::Shape { .. }) && error.to_string().contains("'y'"), "{error}");
    let error = elementwise::add(&mut rec, &x, &x, &y).unwrap_err();
    assert!(matches!(error, GpuError::Shape { .. }), "{error}");
    // One buffer read and written by a dispatch is refused before it reaches the device.
    let error = elementwise::add_assign(&mut rec, &x, &x).unwrap_err();
    assert!(error.to_string().contains("one buffer"), "{error}");
    let error = elementwise::add(&mut rec, &x, &y, &y).unwrap_err();
    assert!(error.to_string().contains("one buffer"), "{error}");
    assert!(rec.is_empty());
}

/// Values rounded to f16, as an f16 tensor holds them.
fn round_f16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// Mixed precision keeps GELU's input and output and their gradients in f16 storage: the
/// kernels widen each load to f32, compute in f32 and round once on the store. So the
/// sum is an f16 neighbour of the exact one, and GELU and tanh are within the f32 tests'
/// tolerance plus one f16 rounding (2^-11 relative; the atol covers results near zero,
/// where erf's absolute error of ~1e-7 decides which f16 subnormal is nearest). Also an
/// f32 gradient into an f16 result, and tanh and add, which share the bindings' types.
#[test]
fn f16_storage_matches_reference() {
    use common::assert_rounded_f16;
    let gpu = gpu();
    for &n in &[7usize, 1000, 70_001] {
        let x_host = round_f16(&random_vec(n, 11, 6.0));
        let dy_host = round_f16(&random_vec(n, 12, 1.0));
        let x = gpu.upload_f16("x", &[n], &x_host).unwrap();
        let dy = gpu.upload_f16("dy", &[n], &dy_host).unwrap();
        let dy32 = gpu.upload("dy32", &[n], &dy_host).unwrap();
        let half = |name: &str| gpu.zeros_of(name, &[n], ElementType::F16).unwrap();
        let (y, dx, dx_from32, t, sum) = (half("y"), half("dx"), half("dx from f32"), half("t"), half("sum"));
        let mut rec = gpu.recorder();
        elementwise::gelu(&mut rec, &x, &y).unwrap();
        elementwise::gelu_backward(&mut rec, &x, &dy, &dx).unwrap();
        elementwise::gelu_backward(&mut rec, &x, &dy32, &dx_from32).unwrap();
        elementwise::tanh(&mut rec, &x, &t).unwrap();
        elementwise::add(&mut rec, &x, &dy, &sum).unwrap();
        rec.submit().unwrap();
        let read = |t| gpu.read_f16(t).unwrap();
        let want_dx = reference::elementwise::gelu_backward(&x_host, &dy_host);
        let (rtol, atol) = (1e-5 + 2f32.powi(-11), 1e-6);
        let want_y = reference::elementwise::gelu_forward(&x_host);
        assert_close(&format!("f16 gelu n={n}"), &read(&y), &want_y, rtol, atol);
        assert_close(&format!("f16 gelu' n={n}"), &read(&dx), &want_dx, rtol, atol);
        assert_close(&format!("f32 dy, f16 gelu' n={n}"), &read(&dx_from32), &want_dx, rtol, atol);
        let want_t = reference::elementwise::tanh_forward(&x_host);
        assert_close(&format!("f16 tanh n={n}"), &read(&t), &want_t, rtol, atol);
        let want_sum: Vec<f32> = x_host.iter().zip(&dy_host).map(|(a, b)| a + b).collect();
        assert_rounded_f16(&format!("f16 add n={n}"), &read(&sum), &want_sum);
    }
}
