//! pnm-tools: what `pnmctl` and the main job need beside the driver
//! library: `.npy` and safetensors files ([`tensorfile`]) and this
//! machine's memory read roofline ([`roofline`]), which every benchmark
//! reports next to its figures.

pub mod accuracy;
pub mod plot;
pub mod roofline;
pub mod synthetic;
pub mod tensorfile;
pub mod testdata;
