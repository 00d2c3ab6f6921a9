//! The tasks a runtime process can serve, each with its routes and its model backend.

pub mod embed;
