//! infergate's shared vocabulary: the two custom resources (`ModelDeployment`, `AccessToken`),
//! the token format, the token record the proxy authenticates against, and the names and
//! defaults every part agrees on. It depends on no other crate of the workspace.

#![forbid(unsafe_code)]

mod access_token;
pub mod manifests;
mod model_deployment;
pub mod names;
mod record;
mod timeouts;
mod token;

pub use access_token::{
    AccessToken, AccessTokenPhase, AccessTokenSpec, AccessTokenStatus, LimitsStatus, ReplicaShare,
    TokenLimits, TokenUsage,
};
pub use kube::core::Duration;
pub use model_deployment::{
    Autoscaling, AutoscalingStatus, ContainerSpec, DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS,
    GenerationDefaults, ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus, ModelSource,
    ModelUri, ModelUriError, Resources, RuntimeSpec, Task,
};
pub use record::{RecordError, TokenRecord};
pub use timeouts::{RequestTimeouts, Timeouts, TimeoutsError};
pub use token::{Token, TokenFormatError, sha256_hex};
