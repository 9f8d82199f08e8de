// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Types and constants shared by the marklb XDP program (`marklb-ebpf`) and user space.
//!
//! Every map key and value is defined here exactly once, `#[repr(C)]` with explicit padding
//! so that it is plain old data on both sides. Addresses and ports are kept in network byte
//! order (`_be` in field docs) because the datapath copies them straight from packets.
#![no_std]

pub mod addr;
pub mod addr_set;
pub mod config;
pub mod conn;
pub mod consts;
pub mod counters;
pub mod decap;
pub mod event;
pub mod flow;
pub mod hash;
pub mod real;
pub mod stats;
pub mod vip;

pub use addr::{addr_words, words_addr};
pub use addr_set::{ADDR_SETS, ADDR_WAYS, AddrSet, addr_set_of};
pub use config::*;
pub use conn::{CONN_WAYS, ConnHash, ConnSet, ConnSlot, conn_sets};
pub use consts::*;
pub use counters::Counter;
pub use decap::DecapCounter;
pub use event::{
    EVENT_CURSOR_HEAD, EVENT_CURSOR_TAIL, EVENT_SLOTS_PER_CPU, EventCursor, NewFlowEvent,
    event_check, event_slot,
};
pub use flow::{
    ConnEntry, DEFAULT_UDP_EVENT_PACKETS, EVENT_RETRY_FIRST, FlowKey, MarkEntry, NicRule,
    TCP_EVENT_PACKETS, event_due,
};
pub use real::{REAL_F_IPV6, RealDef};
pub use stats::TrafficStats;
pub use vip::{VipKey, VipMeta};

/// Marks a type as plain old data for aya in user space. Each type listed here is
/// `#[repr(C)]` without implicit padding (checked by the size asserts in its module).
#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => { $( unsafe impl aya::Pod for $t {} )* };
}
#[cfg(feature = "user")]
impl_pod!(
    LbConfig,
    EventBucket,
    FlowKey,
    ConnEntry,
    MarkEntry,
    NicRule,
    NewFlowEvent,
    EventCursor,
    RealDef,
    TrafficStats,
    VipKey,
    VipMeta,
    BenchFrame,
    ConnSlot,
    AddrSet,
);
