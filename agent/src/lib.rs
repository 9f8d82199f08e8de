//! marklb agent library: the datapath (loading, maps, Maglev rings) and what the daemon and
//! the benchmark build on it.

pub mod balancer;
pub mod bench;
pub mod datapath;
pub mod maglev;
pub mod packet;
pub mod ring_alloc;
