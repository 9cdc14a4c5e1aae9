//! Softmax cross-entropy and mean squared error with per-example weights: shaders/loss.wgsl.
//!
//! Both return the weighted mean over real examples, Σ w_b·loss_b / max(Σ w_b, 1), and its
//! gradient times `grad_scale[0]`, read on the GPU so that a loss scale the optimizer
//! changes there (mixed precision) needs no host sync. Weight 0 masks an example (padding in a last partial batch).

use super::{expect_len, expect_shape, to_u32};
use crate::gpu::{Binding, GpuError, KernelSpec, Recorder, Tensor, spread};

const SOURCE: &str =
    concat!(include_str!("../../shaders/workgroup_reduce.wgsl"), include_str!("../../shaders/loss.wgsl"));
const CE_BINDINGS: &[Binding] = &[Binding::Read, Binding::Read, Binding::Read, Binding::Write];

const CROSS_ENTROPY_LOSS: KernelSpec = KernelSpec {
    name: "cross_entropy_loss",
    source: SOURCE,
    entry: "cross_entropy_loss",
    bindings: CE_BINDINGS,
    trusted: false,
};
const CROSS_ENTROPY_BACKWARD: KernelSpec = KernelSpec {
    name: "cross_entropy_backward",
    source: SOURCE,
    entry: "cross_entropy_backward",
    bindings: &[Binding::Read, Binding::Read, Binding::Read, Binding::Write, Binding::Read],
    trusted: false,
};
const MSE: KernelSpec = KernelSpec {
    name: "mse",
    source: SOURCE,
    entry: "mse",
    bindings: &[Binding::Read, Binding::Read, Binding::Read, Binding::Write, Binding::Write, Binding::Read],
    trusted: false,
};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    classes: u32,
}

/// Softmax cross-entropy of `logits` [B, C] against `labels` (u32 [B]) with `weights` [B]:
/// `loss` [1] gets the weighted mean, `dlogits` [B, C] its gradient times `grad_scale` [1].
/// An example whose label is ≥ C is treated as masked.
pub fn cross_entropy(
    rec: &mut Recorder,
    logits: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
    loss: &Tensor,
    dlogits: &Tensor,
    grad_scale: &Tensor,
) -> Result<(), GpuError> {
    let op = "cross_entropy";
    let [batch, classes] = logits.shape[..] else {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: format!(
                "logits '{}' has shape {:?}, expected [batch, classes]",
                logits.name, logits.shape
            ),
        });
    };
    if classes == 0 {
        return Err(GpuError::Shape {
            op: op.into(),
            detail: format!("logits '{}' has no classes", logits.name),
        });
    }
    expect_len(op, labels, batch)?;
    expect_len(op, weights, batch)?;
    expect_len(op, loss, 1)?;
    expect_shape(op, dlogits, &logits.shape)?;
    expect_len(op, grad_scale, 1)?;
    let params = Params { batch: to_u32(op, "batch", batch)?, classes: to_u32(op, "classes", classes)? };
    rec.dispatch(&CROSS_ENTROPY_LOSS, "", &params, &[logits, labels, weights, loss], [1, 1, 1])?;
    rec.dispatch(
        &CROSS_ENTROPY_BACKWARD,
        "",
        &params,
        &[logits, labels, weights, dlogits, grad_scale],
        spread(rec.gpu, params.batch),
    )
}

/// Mean squared error of `predictions` ([B, 1] or [B]) against `targets` [B] with `weights`
/// [B]: `loss` [1] gets the weighted mean, `dpred` (shaped like `predictions`) its gradient
/// times `grad_scale` [1].
pub fn mse(
    rec: &mut Recorder,
    predictions: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    loss: &Tensor,
    dpred: &Tensor,
    grad_scale: &Tensor,
) -> Result<(), GpuError> {
    let op = "mse";
    let batch = targets.len();
    expect_len(op, predictions, batch)?;
    expect_len(op, weights, batch)?;
    expect_len(op, loss, 1)?;
    expect_shape(op, dpred, &predictions.shape)?;
    expect_len(op, grad_scale, 1)?;
    let params = Params { batch: to_u32(op, "batch", batch)?, classes: 1 };
    rec.dispatch(&MSE, "", &params, &[predictions, targets, weights, loss, dpred, grad_scale], [1, 1, 1])
}
