//! The tasks a runtime process can serve, each with its routes and its model backend.

pub mod classify;
pub mod embed;
pub mod rerank;
pub mod tabular;
