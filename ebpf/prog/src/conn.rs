// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The connection table's datapath side: lookups, in-place refreshes and inserts over the
//! 4-way sets of `CONN_TABLE` (the layout, the check word and why: `marklb_common::conn`).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use marklb_common::{
    ConnEntry, ConnHash, ConnSet, ConnSlot, Counter, FlowKey,
    conn::{conn_stamp, find, place, slot},
};

use crate::{
    maps::{CONN_SET_MASK, CONN_TABLE},
    stats::count,
};

/// Slot time now. The coarse clock (the last tick's time, no clock-source read) is all a
/// 16.8 ms stamp needs.
#[inline(always)]
fn now() -> u32 {
    conn_stamp(unsafe { bpf_ktime_get_coarse_ns() })
}

/// The set a flow whose `flow_hash64` is `hash` lives in, and its place.
#[inline(always)]
fn set_of(hash: u64) -> Option<(&'static mut ConnSet, ConnHash)> {
    // Read at run time: the loader sets it to the sets of the map this program got.
    let h = ConnHash::from_hash(hash, CONN_SET_MASK.load());
    let set = CONN_TABLE.get_ptr_mut(h.set)?;
    Some((unsafe { &mut *set }, h))
}

/// The slot holding a valid entry for `flow` (whose `flow_hash64` is `hash`).
#[inline(always)]
pub fn lookup(flow: &FlowKey, hash: u64) -> Option<&'static mut ConnSlot> {
    let (set, h) = set_of(hash)?;
    let way = find(set, flow, h.key_check)?;
    set.get_mut(way)
}

/// Marks a slot used now (its set evicts the least recently used). Written only when the
/// time moved on, so most packets of a busy flow leave the stamp's word alone.
#[inline(always)]
pub fn touch(s: &mut ConnSlot) {
    let now = now();
    if s.stamp != now {
        s.stamp = now;
    }
}

/// Writes `entry` for `flow`: into its own slot, else an empty one, else over the set's
/// least recently used flow (counted as `conn_evicted`). Never fails once the set is
/// found: a full table evicts.
#[inline(always)]
pub fn insert(flow: &FlowKey, hash: u64, entry: &ConnEntry) {
    if let Some((set, h)) = set_of(hash) {
        write(set, h, flow, entry);
    }
}

#[inline(always)]
fn write(set: &mut ConnSet, h: ConnHash, flow: &FlowKey, entry: &ConnEntry) {
    let now = now();
    let p = place(set, flow, now);
    if let Some(s) = set.get_mut(p.way) {
        *s = slot(flow, entry, h.key_check, now);
        if p.evicts {
            count(Counter::ConnEvicted);
        }
    }
}

/// Records a SYN's pick. A SYN whose flow the table already holds with this very pick (a
/// retransmitted SYN, a client reusing its port toward the same real) only gets its packet
/// count reset and its stamp refreshed, in place, leaving the check word alone; any other
/// entry (another real, a stale generation) or none is written whole.
#[inline(always)]
pub fn learn_syn(flow: &FlowKey, hash: u64, entry: &ConnEntry) {
    let Some((set, h)) = set_of(hash) else {
        return;
    };
    if let Some(way) = find(set, flow, h.key_check)
        && let Some(s) = set.get_mut(way)
    {
        let c = &s.entry;
        if c.real_id == entry.real_id
            && c.real_gen == entry.real_gen
            && c.vip_id == entry.vip_id
            && c.vip_gen == entry.vip_gen
        {
            s.entry.seen = entry.seen;
            touch(s);
            return;
        }
    }
    write(set, h, flow, entry);
}
