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

use crate::gpu::{ElementType, Gpu, GpuError, Tensor};

/// An error naming the adapter unless its shaders can hold f16 (the shader-f16 feature).
pub(crate) fn expect_shader_f16(op: &str, gpu: &Gpu) -> Result<(), GpuError> {
    if gpu.has(wgpu::Features::SHADER_F16) {
        return Ok(());
    }
    let message = format!("f16 tensors need shader-f16, which adapter '{}' lacks", gpu.info.name);
    Err(GpuError::Device { op: op.into(), message })
}

/// The WGSL header naming each aliased binding's storage type (`alias X_TYPE = f16;`),
/// opening with the `enable f16;` a module must start with where one is f16 (an error
/// naming `op` where the adapter lacks shader-f16). Kernels widen every load to f32 and
/// narrow every store: only the storage differs between the variants.
pub(crate) fn storage_aliases(
    op: &str,
    gpu: &Gpu,
    aliases: &[(&str, ElementType)],
) -> Result<String, GpuError> {
    let any_f16 = aliases.iter().any(|(_, t)| *t == ElementType::F16);
    if any_f16 {
        expect_shader_f16(op, gpu)?;
    }
    Ok(String::from(if any_f16 { "enable f16;\n" } else { "" }) + &alias_lines(aliases))
}

/// `alias X_TYPE = f16;` for each (alias, type): for modules that open with their own
/// `enable f16;` (storage_aliases adds it where needed).
pub(crate) fn alias_lines(aliases: &[(&str, ElementType)]) -> String {
    aliases.iter().map(|(alias, dtype)| format!("alias {alias} = {};\n", dtype.wgsl())).collect()
}

/// An error unless `tensor` holds exactly `expected` elements, of either element type.
pub(crate) fn expect_count(op: &str, tensor: &Tensor, expected: usize) -> Result<(), GpuError> {
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

/// An error unless `tensor` holds exactly `expected` f32 elements.
pub(crate) fn expect_len(op: &str, tensor: &Tensor, expected: usize) -> Result<(), GpuError> {
    // Most kernels read and write only 4-byte elements.
    tensor.expect_type(op, ElementType::F32)?;
    expect_count(op, tensor, expected)
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
