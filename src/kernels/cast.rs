//! Casts between element types: shaders/cast.wgsl.

use super::{expect_len, expect_shader_f16, to_u32};
use crate::gpu::{Binding, ElementType, GpuError, KernelSpec, Recorder, Tensor, spread};

const CAST_F16: KernelSpec = KernelSpec {
    name: "cast_f16",
    source: include_str!("../../shaders/cast.wgsl"),
    entry: "cast_f16",
    bindings: &[Binding::Read, Binding::Write],
    trusted: false,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
}

/// dst (f16) = src (f32) rounded to f16; an error naming the adapter without shader-f16.
pub fn cast_f16(rec: &mut Recorder, src: &Tensor, dst: &Tensor) -> Result<(), GpuError> {
    let op = "cast_f16";
    expect_len(op, src, src.len())?;
    dst.expect_type(op, ElementType::F16)?;
    if dst.len() != src.len() {
        let detail = format!("'{}' has {} elements, '{}' {}", dst.name, dst.len(), src.name, src.len());
        return Err(GpuError::Shape { op: op.into(), detail });
    }
    expect_shader_f16(op, rec.gpu)?;
    let n = to_u32(op, "n", src.len())?;
    rec.dispatch(&CAST_F16, "", &Params { n }, &[src, dst], spread(rec.gpu, n.div_ceil(256)))
}
