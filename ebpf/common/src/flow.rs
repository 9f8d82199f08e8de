// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Flows, established connections and flow marks.

use core::net::IpAddr;

use crate::addr::addr_words;

/// A connection's 5-tuple. IPv4 addresses use word 0 only, the other words are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Client address, network byte order.
    pub src_be: [u32; 4],
    /// VIP address, network byte order.
    pub dst_be: [u32; 4],
    /// Client port, network byte order.
    pub sport_be: u16,
    /// VIP port, network byte order.
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The 5-tuple of a packet from `src:sport` to `dst:dport` (ports in host order).
    pub fn new(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> Self {
        Self {
            src_be: addr_words(src),
            dst_be: addr_words(dst),
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            proto,
            _pad: [0; 3],
        }
    }
}

/// Value of the connection table: the real an established flow was sent to, and its VIP,
/// so an established packet needs no VIP lookup (the VIP's generation proves it is
/// still there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub real_id: u32,
    /// `RealDef::generation` when the flow was assigned; a mismatch means the real left.
    pub real_gen: u32,
    pub vip_id: u32,
    /// `VipMeta::generation` when the flow was assigned; a mismatch means the VIP left.
    pub vip_gen: u32,
}
const _: () = assert!(core::mem::size_of::<ConnEntry>() == 16);

/// Value of the emulated NIC's flow table: the rule's mark and a hit counter, which the
/// agent samples to age idle flows (as it reads flower rule statistics on a real NIC).
/// The counter is bumped without atomics: concurrent CPUs may lose increments, which is
/// harmless for telling "used" from "idle".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicRule {
    pub mark: u32,
    pub _pad: u32,
    pub hits: u64,
}
const _: () = assert!(core::mem::size_of::<NicRule>() == 16);

/// Value of the mark map (`MARKS[mark]`): where packets carrying the mark go.
/// Per-flow marks identify one connection, per-real marks one (VIP, real) pair; the
/// datapath treats both the same. `real_id == 0` is an invalid (free) mark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkEntry {
    pub real_id: u32,
    /// Must equal the real's current generation, otherwise the mark is stale.
    pub real_gen: u32,
    /// VIP whose counters the packet is accounted to.
    pub vip_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MarkEntry>() == 16);
