//! The points where a task method joins the encoder's layers (tasks/ implements them for
//! PALs, low-rank layers, adapters and top projected attention). Every point defaults to
//! doing nothing, which is the plain encoder ([`NoHook`]). In layer l's forward, with the
//! hook's terms written T1, T2:
//!
//! ```text
//! a   = LN1(attn_drop + h),  attn_drop = Dropout_ao(ctx·Woᵀ + bo) + T1   (attention_output)
//! out = LN2(ffn_drop + a),   ffn_drop  = Dropout_ffn(FFN(a)) + T2         (ffn_output)
//! ```
//!
//! The backward calls, in layer l, in this order:
//! 1. `ffn_output_backward`: `acts.grad_y` holds d(LN2's input) = dT2; read it, don't write it.
//! 2. `ffn_input_backward`: `acts.grad_y` holds d a (LN2's residual and the FFN's share); add
//!    the hook's share.
//! 3. `attention_output_backward`: `acts.grad_x` holds d(LN1's input) = dT1, which is also
//!    d h through the residual, so it must stay as it is: return the tensor holding
//!    d Dropout_ao(…) (`grad_x` itself, or a hook buffer with the hook's share added). A
//!    hook that adds a share says so in `adds_attention_output_grad`; otherwise the
//!    encoder takes Dropout_ao's backward from LN1's backward pass and ignores the return.
//! 4. `input_backward`: `acts.grad_x` holds d h; add the hook's share.
//!
//! Two more points let a hook replace the sequence output (top projected attention):
//! - `sequence_output`, after the last layer and before the pooler: `acts.hidden[L]` holds
//!   the last layer's output; the hook may overwrite it (saving what its backward needs),
//!   and the pooler and the caller then read the replacement there.
//! - `sequence_output_backward`, first in the backward after the pooler's: `acts.grad_x`
//!   holds d(sequence output) (d_seq plus the pooler's share); the hook leaves d(last
//!   layer's output) there. `acts.colsum` is free to use.

use super::DropoutKey;
use super::bert::Activations;
use super::inputs::BatchInputs;
use crate::gpu::{GpuError, Recorder, Tensor};

/// What every hook point sees of the step: the encoder's buffers, the batch, and the
/// dropout key (None: no dropout).
pub struct HookStep<'a> {
    pub acts: &'a Activations,
    pub inputs: &'a BatchInputs,
    pub key: Option<DropoutKey>,
}

pub trait LayerHook {
    fn attention_output(&self, _rec: &mut Recorder, _step: &HookStep, _layer: usize) -> Result<(), GpuError> {
        Ok(())
    }

    fn ffn_output(&self, _rec: &mut Recorder, _step: &HookStep, _layer: usize) -> Result<(), GpuError> {
        Ok(())
    }

    fn ffn_output_backward(
        &self,
        _rec: &mut Recorder,
        _step: &HookStep,
        _layer: usize,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    fn ffn_input_backward(
        &self,
        _rec: &mut Recorder,
        _step: &HookStep,
        _layer: usize,
    ) -> Result<(), GpuError> {
        Ok(())
    }

    /// Whether `attention_output_backward` adds the hook's share to d Dropout_ao(…) (then
    /// Dropout_ao's backward runs after it, not fused into LN1's backward).
    fn adds_attention_output_grad(&self) -> bool {
        false
    }

    fn attention_output_backward<'a>(
        &'a self,
        _rec: &mut Recorder,
        step: &HookStep<'a>,
        _layer: usize,
    ) -> Result<&'a Tensor, GpuError> {
        Ok(&step.acts.grad_x)
    }

    fn input_backward(&self, _rec: &mut Recorder, _step: &HookStep, _layer: usize) -> Result<(), GpuError> {
        Ok(())
    }

    fn sequence_output(&self, _rec: &mut Recorder, _step: &HookStep) -> Result<(), GpuError> {
        Ok(())
    }

    fn sequence_output_backward(&self, _rec: &mut Recorder, _step: &HookStep) -> Result<(), GpuError> {
        Ok(())
    }
}

/// The plain encoder: no task-specific terms.
pub struct NoHook;

impl LayerHook for NoHook {}
