pub mod bench;
pub mod gpu;
pub mod kernels;
pub mod reference;
