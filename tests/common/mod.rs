//! Shared by the GPU tests: one adapter for the whole test binary, and tolerant comparison.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use pals::gpu::Gpu;

pub mod tiny;

/// The adapter `PALS_ADAPTER`/`PALS_BACKEND` choose, else the best one. Without one the
/// test fails, saying how to get one: GPU tests never pass silently.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::from_env() {
        Ok(gpu) => {
            eprintln!("GPU tests run on {}", gpu.describe());
            gpu
        }
        Err(error) => panic!("GPU tests need a GPU adapter: {error}"),
    })
}

/// Fails unless |got - want| <= atol + rtol * |want| everywhere; reports the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > 0.0 || g.is_nan() != w.is_nan() {
            let excess = if excess.is_nan() { f32::INFINITY } else { excess };
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!("{what}: element {i}: got {} want {} (rtol {rtol}, atol {atol})", got[i], want[i]);
    }
}

/// Fails unless each `got` (an f16 value, widened) is one of the two f16 neighbours of the
/// exact `want`, as WGSL allows an f32 → f16 conversion to give; says how many were not the
/// nearest-even one (the host's rounding), so a test shows what this adapter does.
pub fn assert_rounded_f16(what: &str, got: &[f32], want: &[f32]) {
    use half::f16;
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut not_nearest = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let nearest = f16::from_f32(w);
        if g.to_bits() == nearest.to_f32().to_bits() {
            continue;
        }
        // The neighbour on w's other side (bits step by one ulp away from zero or toward).
        let away = (nearest.to_f32().abs() < w.abs()) as i32 * 2 - 1;
        let other = f16::from_bits((nearest.to_bits() as i32 + away) as u16).to_f32();
        assert!(g == other, "{what}: element {i}: got {g}, want {} or {other} (from {w})", nearest.to_f32());
        not_nearest += 1;
    }
    eprintln!("{what}: {not_nearest} of {} rounded other than to nearest even", got.len());
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("pals-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
