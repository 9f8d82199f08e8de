// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Virtual IPs: what the balancer serves.

/// VIP lookup key. IPv4 addresses use word 0 only, the other words are zero.
/// A key with `port_be == 0` matches every port of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// Address, network byte order.
    pub addr_be: [u32; 4],
    /// Port, network byte order (0: all ports).
    pub port_be: u16,
    /// IP protocol (`IPPROTO_TCP` or `IPPROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// What the datapath needs to know about a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into the per-VIP stats array (`< MAX_VIPS`).
    pub vip_id: u32,
    /// Start of this VIP's Maglev ring inside the shared ring storage.
    pub ring_off: u32,
    /// Maglev table size (a prime); 0 means the VIP has no reals and drops.
    pub ring_size: u32,
    /// Generation of the `vip_id` slot (also in `VIP_GENS[vip_id]`): connection-table
    /// entries remember it, so flows of a removed VIP never use a reused slot.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);
