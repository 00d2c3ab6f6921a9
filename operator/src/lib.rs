//! infergate's operator: reconciles ModelDeployments into runtime pods and AccessTokens into
//! token records.
//!
//! What the objects should be is written as pure functions (`desired`, `tokens`, `status`);
//! the controllers (`controller`, `model_deployments`, `access_tokens`) read the cluster, call
//! them and write the difference (`apply`). `lease` elects the one replica that writes;
//! `internal_keys` keeps the proxy's signing keys rotated and their public halves published;
//! `autoscaler` sizes the ModelDeployments that ask for it from the load the proxies report.

#![forbid(unsafe_code)]

pub mod access_tokens;
pub mod apply;
pub mod autoscaler;
pub mod controller;
pub mod desired;
pub mod enforcement;
pub mod internal_keys;
pub mod lease;
pub mod local;
pub mod model_deployments;
pub mod snippet_command;
pub mod snippets;
pub mod status;
pub mod telemetry;
pub mod token_commands;
pub mod tokens;
pub mod usage;
