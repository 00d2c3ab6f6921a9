//! Whole-system tests of infergate, run against local mode, the control plane built in
//! `e2e/cluster/` and kind. The suite lands with the local-mode issue; this crate reserves its
//! place in the workspace and its dependency rule: it may use `crds` and nothing else of ours.

#![forbid(unsafe_code)]
