// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Counter updates. Per-CPU arrays: no atomics needed, user space sums at read time.

use marklb_common::Counter;

use crate::{
    maps::{COUNTERS, REAL_STATS, VIP_STATS},
    pkt::Action,
};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        unsafe { *p += 1 };
    }
}

/// Accounts a forwarded packet to its VIP and real.
#[inline(always)]
pub fn account(vip_id: u32, real_id: u32, bytes: u64) {
    if let Some(s) = VIP_STATS.get_ptr_mut(vip_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
    if let Some(s) = REAL_STATS.get_ptr_mut(real_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}

/// Counts `c` and passes the packet to the stack.
#[inline(always)]
pub fn pass(c: Counter) -> Action {
    count(c);
    Action::Pass
}

/// Counts `c` and drops the packet.
#[inline(always)]
pub fn drop(c: Counter) -> Action {
    count(c);
    Action::Drop
}
