//! The f32 → f16 cast on the GPU against the host's rounding, at lengths that are not
//! multiples of the 256-invocation workgroup (and odd, so the last f16 shares a word).

mod common;

use common::{assert_rounded_f16, gpu};
use pals::gpu::ElementType;
use pals::kernels::cast;
use pals::reference::random_vec;

#[test]
fn cast_f16_rounds_every_value_to_an_f16_neighbour() {
    let gpu = gpu();
    for n in [1, 7, 1000, 65_537] {
        let mut host = random_vec(n, n as u32, 4.0);
        // Magnitudes across the f16 range: subnormals (below 6.1e-5) to near 65504.
        for (i, v) in host.iter_mut().enumerate() {
            *v *= [1.0, 1e-6, 3e-3, 1e3, 1.6e4][i % 5];
        }
        let src = gpu.upload("src", &[n], &host).unwrap();
        let dst = gpu.zeros_of("dst", &[n], ElementType::F16).unwrap();
        let mut rec = gpu.recorder();
        cast::cast_f16(&mut rec, &src, &dst).unwrap();
        rec.submit().unwrap();
        assert_rounded_f16(&format!("cast n={n}"), &gpu.read_f16(&dst).unwrap(), &host);
    }
}

/// Beyond ±65504 (a loss scale too large for f16 activations) the result must be infinite,
/// or overflow would go unnoticed by the loss scaler.
#[test]
fn cast_f16_overflows_to_infinity() {
    let gpu = gpu();
    let host = [1e5f32, -7e4, 65504.0, f32::INFINITY, f32::NAN];
    let src = gpu.upload("src", &[host.len()], &host).unwrap();
    let dst = gpu.zeros_of("dst", &[host.len()], ElementType::F16).unwrap();
    let mut rec = gpu.recorder();
    cast::cast_f16(&mut rec, &src, &dst).unwrap();
    rec.submit().unwrap();
    let got = gpu.read_f16(&dst).unwrap();
    assert_eq!(got[..4], [f32::INFINITY, f32::NEG_INFINITY, 65504.0, f32::INFINITY]);
    assert!(got[4].is_nan(), "NaN stays NaN: {}", got[4]);
}

#[test]
fn cast_f16_refuses_wrong_types_and_lengths() {
    let gpu = gpu();
    let src = gpu.zeros("src", &[10]).unwrap();
    let f32_dst = gpu.zeros("f32 dst", &[10]).unwrap();
    let short = gpu.zeros_of("short", &[9], ElementType::F16).unwrap();
    let mut rec = gpu.recorder();
    let error = cast::cast_f16(&mut rec, &src, &f32_dst).unwrap_err().to_string();
    assert!(error.contains("'f32 dst'") && error.contains("F16"), "{error}");
    let error = cast::cast_f16(&mut rec, &src, &short).unwrap_err().to_string();
    assert!(error.contains("'short'") && error.contains("9"), "{error}");
    let error = cast::cast_f16(&mut rec, &short, &short).unwrap_err().to_string();
    assert!(error.contains("'short'") && error.contains("F32"), "{error}");
    assert!(rec.is_empty());
}
