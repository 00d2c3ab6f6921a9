//! infergate's operator: reconciles ModelDeployments into runtime pods and AccessTokens into
//! token records. So far: the desired objects of a ModelDeployment (`desired`) and of an AccessToken (`tokens`), as pure functions; the controllers that apply
//! them are built on top in the operator issue.

#![forbid(unsafe_code)]

pub mod desired;
pub mod tokens;
