//! infergate's data plane, on pingora-core: it authenticates each request with a token record,
//! checks the token's scope and expiry, applies the request's deadline, picks a ready endpoint
//! of the model and streams the exchange (docs/architecture.md, proxy contract).

pub mod config;
pub mod error;
pub mod file_source;
pub mod gateway;
pub mod header_guard;
pub mod kube_source;
pub mod limits;
pub mod metrics;
pub mod request;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod upstream;
