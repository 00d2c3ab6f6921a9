//! infergate's data plane. This crate holds the request-parsing edges (the model path, the
//! credential headers and the deadline header); the pingora service that uses them is built on
//! top in the proxy issue.

pub mod request;
