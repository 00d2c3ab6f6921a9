//! The tasks a runtime process can serve, each with its routes and its model backend.

pub mod classify;
pub mod embed;
pub mod generation;
pub mod image;
pub mod rerank;
pub mod synthesize;
pub mod tabular;
pub mod transcribe;
pub mod translate;

use serde::Deserialize;

use crate::error::ApiError;

/// TEI's `truncation_direction`. Inputs are cut at the end only.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum TruncationDirection {
    Right,
    Left,
}

/// Refuses `Left`, the one direction TEI defines that this runtime does not cut.
pub fn require_right_truncation(direction: Option<TruncationDirection>) -> Result<(), ApiError> {
    match direction {
        Some(TruncationDirection::Left) => Err(ApiError::InvalidField(
            "truncation_direction: only Right is supported".to_owned(),
        )),
        _ => Ok(()),
    }
}
