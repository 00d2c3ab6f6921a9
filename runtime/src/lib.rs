//! infergate's model server on libtorch. This crate starts with the device choice every task
//! shares; the HTTP server and the models are built on top in the runtime issues.

#![forbid(unsafe_code)]

pub mod device;
