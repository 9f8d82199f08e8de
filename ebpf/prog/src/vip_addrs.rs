// SPDX-License-Identifier: GPL-2.0 OR MIT
//! "Is this destination a VIP address?", asked of every packet: its set in
//! `VIP_ADDR_SETS`, and the kernel hash map only if the set spilled
//! (`marklb_common::addr_set`).

use marklb_common::addr_set::{addr_set_of, holds};

use crate::maps::{VIP_ADDR_SETS, VIP_ADDRS};

#[inline(always)]
pub fn is_vip_addr(addr: &[u32; 4]) -> bool {
    let spill = match VIP_ADDR_SETS.get(addr_set_of(addr)) {
        Some(set) if holds(set, addr) => return true,
        Some(set) => set.spill != 0,
        // Not reached (the index is masked to the map's size); the authority answers.
        None => true,
    };
    spill && unsafe { VIP_ADDRS.get(addr) }.is_some()
}
