//! `shared`: nothing inside the layers, only the heads are task-specific. `separate` is
//! the same model trained once per task (the trainer does that); here it only differs in
//! its parameter count, each task having its own encoder.

use super::TaskActivations;
use super::method::{Bucket, MethodBuffers, MethodName, TaskMethod, TaskTerms};
use crate::gpu::GpuError;
use crate::model::BertConfig;
use crate::model::bert::ByName;
use crate::model::blocks::Alloc;
use crate::model::hook::{LayerHook, NoHook};

pub struct Shared {
    pub separate: bool,
}

impl TaskMethod for Shared {
    fn name(&self) -> MethodName {
        if self.separate { MethodName::Separate } else { MethodName::Shared }
    }

    fn param_shapes(&self, _c: &BertConfig, _prefix: &str) -> Vec<(String, Vec<usize>)> {
        Vec::new()
    }

    fn own_encoder(&self) -> bool {
        self.separate
    }

    fn terms(
        &self,
        _c: &BertConfig,
        _prefix: &str,
        _params: &ByName,
        _grads: Option<&ByName>,
    ) -> Box<dyn TaskTerms> {
        Box::new(NoTerms)
    }
}

impl MethodBuffers for Shared {
    type Acts<T> = ();

    fn build<T: Clone>(&self, _c: &BertConfig, _bucket: Bucket, _alloc: Alloc<T>) -> Result<(), GpuError> {
        Ok(())
    }
}

struct NoTerms;

impl TaskTerms for NoTerms {
    fn hook<'a>(
        &'a self,
        _c: &'a BertConfig,
        _acts: &'a TaskActivations,
    ) -> Result<Box<dyn LayerHook + 'a>, GpuError> {
        Ok(Box::new(NoHook))
    }
}
