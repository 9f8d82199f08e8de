// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The decapsulation program that runs on the reals (`marklb-decap`): it strips the outer
//! IPv4/IPv6 header the balancer added (IPv4-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6) from
//! packets addressed to one of the real's own addresses, so the stack receives the inner
//! packet (addressed to the VIP on the real's loopback) without tunnel devices.
//!
//! Its maps are separate from the balancer's: the two objects never share state.

/// Local addresses the decapsulator accepts as outer destinations.
pub const MAX_DECAP_ADDRS: u32 = 1024;

/// Value bit of `DECAP_ADDRS`: the key is an IPv4 address (word 0, other words zero).
pub const DECAP_ADDR_V4: u32 = 1 << 0;
/// Value bit of `DECAP_ADDRS`: the key is an IPv6 address.
pub const DECAP_ADDR_V6: u32 = 1 << 1;

/// `DECAP_CONFIG` flag: encapsulated packets whose outer destination is not a local
/// address are dropped (counted as `drop_not_for_us`) instead of passed untouched.
pub const DECAP_F_DROP_FOREIGN: u32 = 1 << 0;

pub mod decap_map_names {
    /// Hash `[u32; 4]` (network-order address words, as the balancer's) -> `DECAP_ADDR_*` bits.
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    /// Per-CPU `u64` array indexed by `DecapCounter`.
    pub const DECAP_COUNTERS: &str = "DECAP_COUNTERS";
    /// One `u32` of `DECAP_F_*` flags.
    pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
}

pub mod decap_prog_names {
    /// XDP variant (native or generic).
    pub const XDP: &str = "marklb_decap";
    /// TC variant (tcx or cls_bpf ingress) for interfaces where XDP cannot be used.
    pub const TC: &str = "marklb_decap_tc";
}

macro_rules! decap_counters {
    ($($(#[$doc:meta])* $name:ident = $idx:literal => $label:literal,)*) => {
        /// Per-path counters of the decapsulator. Every packet bumps exactly one.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DecapCounter {
            $($(#[$doc])* $name = $idx,)*
        }
        impl DecapCounter {
            pub const ALL: &'static [DecapCounter] = &[$(DecapCounter::$name,)*];
            /// Stable snake_case name, used as a metric label.
            pub const fn label(self) -> &'static str {
                match self { $(DecapCounter::$name => $label,)* }
            }
        }
    };
}

decap_counters! {
    /// IPv4-in-IPv4 decapsulated, inner packet passed to the stack.
    DecapIpip = 0 => "decap_ipip",
    /// IPv6-in-IPv6 decapsulated.
    DecapIp6ip6 = 1 => "decap_ip6ip6",
    /// IPv4-in-IPv6 decapsulated.
    DecapIp4ip6 = 2 => "decap_ip4ip6",
    /// Not IPv4/IPv6 (ARP, VLAN, ...): passed untouched.
    PassNotIp = 3 => "pass_not_ip",
    /// IP but not an encapsulated packet (other protocol, too short to tell): passed untouched.
    PassNotEncapsulated = 4 => "pass_not_encapsulated",
    /// Encapsulated, but the outer destination is not a local address: passed untouched.
    PassNotForUs = 5 => "pass_not_for_us",
    /// Encapsulated, outer destination not local, `DECAP_F_DROP_FOREIGN` set: dropped.
    DropNotForUs = 6 => "drop_not_for_us",
    /// Encapsulated for us but truncated or inconsistent (outer/inner lengths, inner version).
    DropMalformed = 7 => "drop_malformed",
    /// Encapsulated for us with IPv4 options on the outer header.
    DropIpOptions = 8 => "drop_ip_options",
    /// Encapsulated for us but a fragment (IPv4 MF/offset, IPv6 fragment header).
    DropFragment = 9 => "drop_fragment",
    /// Encapsulated for us with a wrong outer IPv4 header checksum.
    DropBadChecksum = 10 => "drop_bad_checksum",
    /// Removing the outer header failed (helper error).
    DropAdjustFailed = 11 => "drop_adjust_failed",
}

pub const NUM_DECAP_COUNTERS: u32 = 12;
const _: () = assert!(DecapCounter::ALL.len() as u32 == NUM_DECAP_COUNTERS);

impl DecapCounter {
    /// Counters of packets that were decapsulated.
    pub const DECAPSULATED: &'static [DecapCounter] = &[
        DecapCounter::DecapIpip,
        DecapCounter::DecapIp6ip6,
        DecapCounter::DecapIp4ip6,
    ];

    /// True for the counters of dropped packets.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            DecapCounter::DropNotForUs
                | DecapCounter::DropMalformed
                | DecapCounter::DropIpOptions
                | DecapCounter::DropFragment
                | DecapCounter::DropBadChecksum
                | DecapCounter::DropAdjustFailed
        )
    }
}
