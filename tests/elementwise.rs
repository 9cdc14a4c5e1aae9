//! GELU, tanh and dropout on the GPU against the CPU reference.

mod common;

use common::{assert_close, gpu};
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
        for p in [0.0f32, 0.1, 0.5] {
            let x_host = random_vec(n, 5, 1.0);
            let x = gpu.upload("x", &[n], &x_host).unwrap();
            let y = gpu.zeros("y", &[n]).unwrap();
            let mut rec = gpu.recorder();
            elementwise::dropout(&mut rec, &x, &y, DropoutSpec { p, seed: 42, stream: 9 }).unwrap();
            rec.submit().unwrap();
            let got = gpu.read::<f32>(&y).unwrap();
            let want = reference::elementwise::dropout(&x_host, p, 42, 9);
            // The mask must agree bit for bit: every zero where the reference has one.
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(*g == 0.0, *w == 0.0, "dropout mask differs at {i} (n={n}, p={p})");
            }
            assert_close(&format!("dropout n={n} p={p}"), &got, &want, 1e-6, 0.0);
        }
    }
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
