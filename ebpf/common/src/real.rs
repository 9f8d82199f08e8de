// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Real servers (backends) that receive encapsulated packets.

/// The real is an IPv6 address (outer header IPv6); otherwise IPv4.
pub const REAL_F_IPV6: u32 = 1 << 0;

/// One real, indexed by `real_id` in the `REALS` array. `gen == 0` marks a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RealDef {
    /// Address, network byte order (IPv4: word 0).
    pub addr_be: [u32; 4],
    /// `REAL_F_*` bits.
    pub flags: u32,
    /// Generation of this slot: changes whenever the slot is given to another real.
    /// Connection-table entries and marks remember the generation they were made with,
    /// so a stale entry can never send a packet to whoever holds the slot now.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<RealDef>() == 24);
