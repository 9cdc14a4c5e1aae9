//! The GPU runtime: adapter choice, tensors, the pipeline cache and the recorder that
//! puts many dispatches into one compute pass and one submit. Knows nothing about BERT.

mod context;
mod recorder;
mod tensor;
mod tune;

pub use context::{
    AdapterChoice, Gpu, GpuError, OPTIONAL_FEATURES, cooperative_matrix_summary, list_adapters,
};
pub use recorder::{Binding, KernelSpec, Readback, Recorder, Timing, spread};
pub use tensor::{ElementType, Tensor};
pub use tune::{TuneCache, cache_dir, tuning_enabled};
