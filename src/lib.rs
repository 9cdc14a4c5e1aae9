pub mod bench;
pub mod data;
pub mod encode;
pub mod gpu;
pub mod kernels;
pub mod model;
pub mod reference;
pub mod train;
