// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Global per-path counters (`COUNTERS`, a per-CPU array indexed by `Counter`).
//! Every exit of the balancer bumps exactly one path counter (`Pass*`, `Drop*`, or a
//! forwarding path), so the counters add up to the packets seen.

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $idx:literal => $label:literal,)*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $name = $idx,)*
        }
        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// Stable snake_case name, used as a metric label.
            pub const fn label(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }
        }
    };
}

counters! {
    /// Forwarded on the mark fast path.
    MarkHit = 0 => "mark_hit",
    /// Forwarded from the connection table (established flow).
    ConnHit = 1 => "established",
    /// Forwarded after a Maglev pick (new flow).
    NewFlow = 2 => "new_flow",
    /// Not for a VIP (other address, port or protocol): passed untouched.
    PassNotVip = 3 => "pass_not_vip",
    /// Not IPv4/IPv6 (ARP, LLDP, VLAN, ...): passed untouched.
    PassNotIp = 4 => "pass_not_ip",
    /// Malformed before a VIP matched (truncated, bad version or IHL): passed to the stack.
    PassMalformed = 5 => "pass_malformed",
    /// ICMP echo request to a VIP answered.
    IcmpEchoReply = 6 => "icmp_echo_reply",
    /// ICMP "fragmentation needed" / "packet too big" about a VIP flow forwarded to its real.
    IcmpTooBigForwarded = 7 => "icmp_too_big_forwarded",
    /// Packet too large after encapsulation answered with ICMP too big.
    IcmpTooBigSent = 8 => "icmp_too_big_sent",
    /// Packet too large after encapsulation dropped (ICMP replies disabled).
    DropMtu = 9 => "drop_mtu",
    /// VIP packet truncated or inconsistent (lengths, L4 header).
    DropMalformed = 10 => "drop_malformed",
    /// VIP packet with IPv4 options.
    DropIpOptions = 11 => "drop_ip_options",
    /// VIP packet that is a fragment.
    DropFragment = 12 => "drop_fragment",
    /// VIP packet with IPv6 extension headers or an unsupported ICMP.
    DropUnsupported = 13 => "drop_unsupported",
    /// VIP without reals (empty ring) or an invalid ring entry.
    DropNoReal = 14 => "drop_no_real",
    /// Encapsulation failed (no headroom).
    DropEncap = 15 => "drop_encap",
    /// Mark present but unknown or invalidated: fell back to the normal path.
    MarkMiss = 16 => "mark_miss",
    /// Mark pointing at a real that left: fell back to the normal path.
    MarkStale = 17 => "mark_stale",
    /// New-flow event delivered to the ring buffer.
    EventSent = 18 => "event_sent",
    /// New-flow event lost: ring buffer full.
    EventLost = 19 => "event_lost",
    /// New-flow event suppressed by the per-CPU rate limit.
    EventRateLimited = 20 => "event_rate_limited",
    /// Emulated NIC: packet matched a flow rule and got a mark.
    NicMarked = 21 => "nic_marked",
    /// Emulated NIC: no rule, packet left unmarked.
    NicUnmarked = 22 => "nic_unmarked",
    /// Emulated NIC: tail call into the balancer failed (balancer not loaded): passed.
    NicTailCallFailed = 23 => "nic_tail_call_failed",
    /// Datapath not enabled yet (no configuration): passed.
    PassDisabled = 24 => "pass_disabled",
    /// Not a path: a connection-table insert overwrote another flow's entry (its set was
    /// full; the set's least recently used flow left).
    ConnEvicted = 25 => "conn_evicted",
}

pub const NUM_COUNTERS: u32 = 26;
const _: () = assert!(Counter::ALL.len() as u32 == NUM_COUNTERS);
