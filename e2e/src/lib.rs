//! Whole-system tests of infergate, black box: HTTP, kubectl and the binaries, against local
//! mode, the control plane built in `e2e/cluster/` and kind. It may use `crds` and nothing else
//! of ours. The tests live in `tests/`: the CRDs on a real API server, and the whole system on
//! the cluster test bed. `src/bin/infergate-node-agent.rs` is the test bed's stand-in kubelet.

#![forbid(unsafe_code)]
