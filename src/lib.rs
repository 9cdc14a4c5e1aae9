pub mod gpu;
pub mod kernels;
pub mod reference;
