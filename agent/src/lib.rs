//! marklb agent library: the datapath (loading, maps, Maglev rings) and what the daemon and
//! the benchmark build on it.

pub mod attach;
pub mod balancer;
pub mod bench;
pub mod control_bench;
pub mod daemon;
pub mod datapath;
pub mod decap;
pub mod desired;
pub mod http;
pub mod maglev;
pub mod marks;
pub mod metrics;
pub mod netlink;
pub mod offload;
pub mod packet;
pub mod reconcile;
pub mod ring_alloc;
pub mod state;
