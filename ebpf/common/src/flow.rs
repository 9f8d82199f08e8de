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
/// still there), and how many of its packets the normal path saw (which decides when the
/// flow has earned a mark: see [`event_due`]).
///
/// 16 bytes, the layout of the entries before `seen` existed (a 32-bit `vip_id`): on a
/// little-endian machine an entry a previous agent pinned reads as this VIP with `seen` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub real_id: u32,
    /// `RealDef::generation` when the flow was assigned; a mismatch means the real left.
    pub real_gen: u32,
    /// The VIP's stats slot (below `MAX_VIPS`, 4096).
    pub vip_id: u16,
    /// Packets of the flow the normal path handled, wrapping at 65,536 (a marked flow's
    /// packets take the mark path and are not counted).
    pub seen: u16,
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

/// Packets a TCP flow's normal path must see before it raises its new-flow event: the SYN
/// (or whichever packet first taught the connection table) and one more, so the event
/// comes with the handshake's ACK at the earliest. A SYN never raises it: spoofed SYNs
/// that never complete a handshake take no mark and cost no event.
pub const TCP_EVENT_PACKETS: u16 = 2;
/// Default packets a UDP flow needs before its event (`LbConfig::udp_event_packets` 0):
/// one-shot exchanges (DNS, NTP) never take a mark; a flow that keeps sending does.
pub const DEFAULT_UDP_EVENT_PACKETS: u8 = 4;
/// An unmarked flow past its threshold raises its event again at `seen` = 16, 32, 64, ...
/// (powers of two, then again after `seen` wraps): a flow whose event was rate-limited or
/// lost, or whose mark was taken back, gets another chance, and a flow that cannot get a
/// mark costs a few events per 65,536 packets, not one per packet.
pub const EVENT_RETRY_FIRST: u16 = 16;

/// Whether the packet that brought a flow's count to `seen` raises its new-flow event,
/// for a flow whose threshold is `threshold` packets (see [`TCP_EVENT_PACKETS`],
/// [`DEFAULT_UDP_EVENT_PACKETS`]).
#[inline(always)]
pub const fn event_due(seen: u16, threshold: u16) -> bool {
    seen == threshold || (seen > threshold && seen >= EVENT_RETRY_FIRST && seen & (seen - 1) == 0)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// The packets (1-based counts) of a flow that raise its event, up to `upto`.
    fn raising(threshold: u16, upto: u32) -> std::vec::Vec<u32> {
        (1..=upto)
            .filter(|&n| event_due(n as u16, threshold))
            .collect()
    }

    #[test]
    fn tcp_raises_after_the_syn_then_at_powers_of_two() {
        assert_eq!(
            raising(TCP_EVENT_PACKETS, 300),
            [2, 16, 32, 64, 128, 256],
            "never the SYN (1)"
        );
    }

    #[test]
    fn udp_raises_at_its_threshold_then_at_powers_of_two_past_it() {
        assert_eq!(raising(4, 40), [4, 16, 32]);
        assert_eq!(raising(1, 20), [1, 16]);
        assert_eq!(raising(40, 300), [40, 64, 128, 256]);
    }

    #[test]
    fn the_count_wraps_and_the_flow_starts_over() {
        let n = raising(TCP_EVENT_PACKETS, 65_536 + 20);
        // 2, 16 ... 32,768 (12 powers of two), then 2 and 16 again after the wrap.
        assert_eq!(n.len(), 15, "{n:?}");
        assert_eq!(&n[n.len() - 3..], [32_768, 65_536 + 2, 65_536 + 16]);
    }
}
