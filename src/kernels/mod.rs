//! One file per shader: shape guards, the binding table, dispatch math and the typed call.

pub mod attention;
pub mod cast;
pub mod elementwise;
pub mod embedding;
pub mod layernorm;
pub mod loss;
pub mod matmul;
pub mod optimizer;
pub mod reduce;

use crate::gpu::{Gpu, GpuError, Tensor};

/// An error naming the adapter unless its shaders can hold f16 (the shader-f16 feature).
pub(crate) fn expect_shader_f16(op: &str, gpu: &Gpu) -> Result<(), GpuError> {
    if gpu.has(wgpu::Features::SHADER_F16) {
        return Ok(());
    }
    let message = format!("f16 tensors need shader-f16, which adapter '{}' lacks", gpu.info.name);
    Err(GpuError::Device { op: op.into(), message })
}

/// An error unless `tensor` holds exactly `expected` elements.
pub(crate) fn expect_len(op: &str, tensor: &Tensor, expected: usize) -> Result<(), GpuError> {
    // Every kernel here reads and writes 4-byte elements.
    tensor.expect_type(op, crate::gpu::ElementType::F32)?;
    if tensor.len() == expected {
        return Ok(());
    }
    Err(GpuError::Shape {
        op: op.to_string(),
        detail: format!(
            "'{}' has shape {:?} ({} elements), expected {expected}",
            tensor.name,
            tensor.shape,
            tensor.len()
        ),
    })
}

/// An error unless `tensor` has exactly `shape`.
pub(crate) fn expect_shape(op: &str, tensor: &Tensor, shape: &[usize]) -> Result<(), GpuError> {
    if tensor.shape == shape {
        return Ok(());
    }
    Err(GpuError::Shape {
        op: op.to_string(),
        detail: format!("'{}' has shape {:?}, expected {shape:?}", tensor.name, tensor.shape),
    })
}

/// Elements to u32 for a kernel's parameter block, an error past 2^32 - 1.
pub(crate) fn to_u32(op: &str, what: &str, value: usize) -> Result<u32, GpuError> {
    u32::try_from(value)
        .map_err(|_| GpuError::Shape { op: op.to_string(), detail: format!("{what} = {value} exceeds u32") })
}
