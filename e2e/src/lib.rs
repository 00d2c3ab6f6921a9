//! Whole-system tests of infergate, black box: HTTP, kubectl and the binaries, against local
//! mode, the control plane built in `e2e/cluster/` and kind. It may use `crds` and nothing else
//! of ours. The tests live in `tests/`; so far the CRDs on a real API server.

#![forbid(unsafe_code)]
