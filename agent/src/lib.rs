//! marklb agent library: the node engine and the datapath library under it, exported for
//! the `marklb-agent` binary, the tests and the demo.
//!
//! Layers point one way, each module using only those below it:
//! - `datapath` (the only code touching aya maps), `maglev`, `packet`;
//! - `model` (what is programmed), `marks` (mark manager, hardware backends);
//! - `desired` (what to program, several LoadBalancers merged), `plan` (the pure diff),
//!   `apply` (carrying a plan out);
//! - `node` (the engine: attach or adopt, apply, events, aging, readiness, report);
//! - sources of desired state on top: `file_source` (standalone), `kubernetes` (this node's
//!   LoadBalancerNodeStates, their status), and `daemon` (the command line), `http`, `metrics`.

pub mod apply;
mod attach;
pub mod daemon;
pub mod datapath;
pub mod decap;
pub mod desired;
mod ethtool;
mod file_source;
mod http;
mod kubernetes;
pub mod maglev;
pub mod marks;
mod metrics;
pub mod model;
mod netlink;
mod node;
mod owner_record;
pub mod packet;
pub mod plan;
mod ring_alloc;
mod rx_offloads;
pub mod status;
pub mod tc;
mod tc_attach;
pub mod vip;
pub mod xdp_link;

/// Mounting the bpf filesystem where pins go (also for tests that pin).
pub use attach::ensure_bpffs;

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "bench")]
pub mod bench_tc;
#[cfg(feature = "bench")]
pub mod control_bench;
