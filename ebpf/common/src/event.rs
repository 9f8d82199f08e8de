// SPDX-License-Identifier: GPL-2.0 OR MIT
//! New-flow notification, sent through the `EVENTS` ring buffer.

use crate::flow::FlowKey;

/// Emitted when the normal path assigns a real to a new flow, so that user space can give
/// the flow (or the real) a mark and program the NIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewFlowEvent {
    pub flow: FlowKey,
    pub vip_id: u32,
    pub real_id: u32,
    pub real_gen: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` when the packet was seen (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NewFlowEvent>() == 64);
