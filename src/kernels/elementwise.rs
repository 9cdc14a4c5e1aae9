//! GELU (exact erf), tanh, dropout and adds: shaders/elementwise.wgsl.

use super::{expect_count, storage_aliases, to_u32};
use crate::gpu::{Binding, ElementType, GpuError, KernelSpec, Recorder, Tensor, spread};
use std::sync::Arc;

const SOURCE: &str = concat!(
    include_str!("../../shaders/rng.wgsl"),
    include_str!("../../shaders/gelu.wgsl"),
    include_str!("../../shaders/elementwise.wgsl")
);
const UNARY: &[Binding] = &[Binding::Read, Binding::Write];
const BINARY: &[Binding] = &[Binding::Read, Binding::Read, Binding::Write];

const GELU_FORWARD: KernelSpec = KernelSpec {
    name: "gelu_forward",
    source: SOURCE,
    entry: "gelu_forward",
    bindings: UNARY,
    trusted: false,
};
const GELU_BACKWARD: KernelSpec = KernelSpec {
    name: "gelu_backward",
    source: SOURCE,
    entry: "gelu_backward",
    bindings: BINARY,
    trusted: false,
};
const TANH_FORWARD: KernelSpec = KernelSpec {
    name: "tanh_forward",
    source: SOURCE,
    entry: "tanh_forward",
    bindings: UNARY,
    trusted: false,
};
const TANH_BACKWARD: KernelSpec = KernelSpec {
    name: "tanh_backward",
    source: SOURCE,
    entry: "tanh_backward",
    bindings: BINARY,
    trusted: false,
};
const DROPOUT: KernelSpec =
    KernelSpec { name: "dropout", source: SOURCE, entry: "dropout", bindings: UNARY, trusted: false };
const COPY: KernelSpec =
    KernelSpec { name: "copy", source: SOURCE, entry: "copy", bindings: UNARY, trusted: false };
const ADD_ASSIGN: KernelSpec =
    KernelSpec { name: "add_assign", source: SOURCE, entry: "add_assign", bindings: UNARY, trusted: false };
const ADD: KernelSpec =
    KernelSpec { name: "add", source: SOURCE, entry: "add", bindings: BINARY, trusted: false };

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    seed: u32,
    stream: u32,
    threshold: u32,
    scale: f32,
    first_index: u32,
}

pub use crate::contract::DropoutSpec;

/// The storage aliases of bindings 1–3 (elementwise.wgsl's header): each tensor's type,
/// f32 for a binding the entry point does not use.
fn storage_types(rec: &Recorder, op: &str, tensors: &[&Tensor]) -> Result<String, GpuError> {
    let of = |i: usize| tensors.get(i).map_or(ElementType::F32, |t| t.dtype);
    storage_aliases(op, rec.gpu, &[("B1_TYPE", of(0)), ("B2_TYPE", of(1)), ("B3_TYPE", of(2))])
}

fn unary(
    rec: &mut Recorder,
    spec: &KernelSpec,
    x: &Tensor,
    y: &Tensor,
    params: Params,
) -> Result<(), GpuError> {
    expect_count(spec.name, y, x.len())?;
    let groups = spread(rec.gpu, to_u32(spec.name, "workgroups", x.len().div_ceil(256))?);
    let defines = storage_types(rec, spec.name, &[x, y])?;
    rec.dispatch(spec, &defines, &params, &[x, y], groups)
}

/// Two inputs of one length, one output: a backward (x, dy → dx) or an add.
fn binary(
    rec: &mut Recorder,
    spec: &KernelSpec,
    x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
) -> Result<(), GpuError> {
    expect_count(spec.name, dy, x.len())?;
    expect_count(spec.name, dx, x.len())?;
    let n = to_u32(spec.name, "n", x.len())?;
    let groups = spread(rec.gpu, n.div_ceil(256));
    let params = Params { n, seed: 0, stream: 0, threshold: 0, scale: 0.0, first_index: 0 };
    let defines = storage_types(rec, spec.name, &[x, dy, dx])?;
    rec.dispatch(spec, &defines, &params, &[x, dy, dx], groups)
}

fn plain(op: &str, n: usize) -> Result<Params, GpuError> {
    Ok(Params { n: to_u32(op, "n", n)?, seed: 0, stream: 0, threshold: 0, scale: 0.0, first_index: 0 })
}

/// y = GELU(x), exact erf form.
pub fn gelu(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<(), GpuError> {
    unary(rec, &GELU_FORWARD, x, y, plain("gelu", x.len())?)
}

/// dx = dy * GELU'(x).
pub fn gelu_backward(rec: &mut Recorder, x: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<(), GpuError> {
    binary(rec, &GELU_BACKWARD, x, dy, dx)
}

/// y = tanh(x).
pub fn tanh(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<(), GpuError> {
    unary(rec, &TANH_FORWARD, x, y, plain("tanh", x.len())?)
}

/// dx = dy * (1 - y^2), from the forward output y.
pub fn tanh_backward(rec: &mut Recorder, y: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<(), GpuError> {
    binary(rec, &TANH_BACKWARD, y, dy, dx)
}

/// y = mask * x / (1 - p). Dropout is linear: its backward is the same call on dy.
pub fn dropout(rec: &mut Recorder, x: &Tensor, y: &Tensor, drop: DropoutSpec) -> Result<(), GpuError> {
    let params = Params {
        threshold: drop.threshold(),
        scale: drop.scale(),
        seed: drop.seed,
        stream: drop.stream,
        first_index: drop.first_index(x.len()),
        ..plain("dropout", x.len())?
    };
    unary(rec, &DROPOUT, x, y, params)
}

/// An error when two tensors share a buffer: a dispatch cannot bind one buffer both
/// read-only and writable.
fn expect_distinct(op: &str, read: &Tensor, write: &Tensor) -> Result<(), GpuError> {
    if Arc::ptr_eq(&read.buffer, &write.buffer) {
        let detail = format!("'{}' and '{}' are one buffer", read.name, write.name);
        return Err(GpuError::Shape { op: op.into(), detail });
    }
    Ok(())
}

/// y = x (bit for bit).
pub fn copy(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<(), GpuError> {
    expect_distinct(COPY.name, x, y)?;
    unary(rec, &COPY, x, y, plain("copy", x.len())?)
}

/// y += x.
pub fn add_assign(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> Result<(), GpuError> {
    expect_distinct(ADD_ASSIGN.name, x, y)?;
    unary(rec, &ADD_ASSIGN, x, y, plain("add_assign", x.len())?)
}

/// out = a + b; `out` must be neither input (use `add_assign` to add in place).
pub fn add(rec: &mut Recorder, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<(), GpuError> {
    expect_distinct(ADD.name, a, out)?;
    expect_distinct(ADD.name, b, out)?;
    binary(rec, &ADD, a, b, out)
}
