// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The connection table: established flows in 4-way sets of a plain array map
//! (`CONN_TABLE`), not a kernel LRU hash.
//!
//! Why: a kernel LRU hash update takes a free node off a locked list (rotating the lists on
//! every insert) before it even looks at the key, then the bucket lock, then frees the old
//! node of a present key; measured, that was 270-540 ns of a new flow's 440-740 (README
//! "Benchmarks"). Here a flow's set is fixed by its hash: a lookup compares at most four
//! keys in four cache lines, an insert overwrites the slot of its own key, else an empty
//! one, else the set's least recently used one. No allocation, no lock, no list.
//!
//! Every CPU reads and writes the same sets (a flow stays known when RSS or veth moves it
//! to another CPU), without locks, so two CPUs may write one slot at once and leave it
//! torn: one flow's key with another's entry. A torn slot must read as a miss (the flow
//! is picked from its Maglev ring again, which names the same real unless the ring
//! changed), never as another flow's real. So each slot carries a check word written with
//! it: a second hash of the key (independent of the bits that chose the set) mixed with the
//! entry's real and VIP. A reader recomputes it from its own flow's hash and the entry it
//! read; a slot whose key, entry and check were not all written for that flow fails it
//! except with probability 2^-32. The packet count (`ConnEntry::seen`) and `stamp` are
//! left out of the check: they are rewritten in place by every packet and a lost or torn
//! update only moves an event or an eviction.
//!
//! The same functions serve the XDP program and user space (the agent's reads, purges and
//! counts, and tests), so both sides agree on where a flow lives and what a valid slot is.

use crate::flow::{ConnEntry, FlowKey};
use crate::hash::flow_hash64;

/// Slots of a set.
pub const CONN_WAYS: usize = 4;

/// One connection-table slot: one 64-byte cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlot {
    /// The flow; all zero in a slot never written (no packet's key is all zero: its
    /// destination is a VIP).
    pub key: FlowKey,
    pub entry: ConnEntry,
    /// [`slot_check`] of the key and entry written together.
    pub check: u32,
    /// When the slot was last used ([`conn_stamp`] units): the set's least recently used
    /// slot is the one evicted.
    pub stamp: u32,
}
const _: () = assert!(core::mem::size_of::<ConnSlot>() == 64);

/// A set: the value of one `CONN_TABLE` element.
pub type ConnSet = [ConnSlot; CONN_WAYS];

/// Sets for a table of `entries` flows: a power of two (a flow's set is a mask of its hash,
/// no division), at least `entries / 4` of them.
pub const fn conn_sets(entries: u32) -> u32 {
    let sets = entries.div_ceil(CONN_WAYS as u32);
    if sets <= 1 {
        1
    } else {
        sets.next_power_of_two()
    }
}

/// A flow's place in the table: its set and the key half of its slot check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnHash {
    pub set: u32,
    pub key_check: u32,
}

impl ConnHash {
    /// `set_mask` is the table's number of sets minus one.
    #[inline(always)]
    pub const fn of(flow: &FlowKey, set_mask: u32) -> Self {
        Self::from_hash(flow_hash64(flow), set_mask)
    }

    /// The same from the flow's [`flow_hash64`].
    #[inline(always)]
    pub const fn from_hash(h: u64, set_mask: u32) -> Self {
        Self {
            set: h as u32 & set_mask,
            key_check: (h >> 32) as u32,
        }
    }
}

/// The check word of a slot holding `entry` for the flow whose key half is `key_check`.
#[inline(always)]
pub const fn slot_check(key_check: u32, entry: &ConnEntry) -> u32 {
    let real = entry.real_id as u64 | ((entry.real_gen as u64) << 32);
    let vip = entry.vip_id as u64 | ((entry.vip_gen as u64) << 32);
    let x = real.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ vip.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(29);
    key_check ^ (x ^ (x >> 32)) as u32
}

/// Slot time of a clock reading in ns: units of 2^24 ns (16.8 ms), which wrap after 2.3
/// years. Coarse on purpose: slots compare ages, and a flow's slot is rewritten only when
/// its time has moved on.
#[inline(always)]
pub const fn conn_stamp(now_ns: u64) -> u32 {
    (now_ns >> 24) as u32
}

/// The way of `set` holding a valid entry for `flow`.
#[inline(always)]
pub fn find(set: &ConnSet, flow: &FlowKey, key_check: u32) -> Option<usize> {
    let mut way = 0;
    while way < CONN_WAYS {
        let s = &set[way];
        if s.entry.real_id != 0 && s.key == *flow && s.check == slot_check(key_check, &s.entry) {
            return Some(way);
        }
        way += 1;
    }
    None
}

/// Where an insert of `flow` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub way: usize,
    /// The slot holds another flow, which the insert evicts.
    pub evicts: bool,
}

/// The slot an insert of `flow` at time `now` ([`conn_stamp`]) takes: the one with its key
/// (valid or torn), else an empty one, else the least recently used (the oldest stamp;
/// ties to the lowest way).
#[inline(always)]
pub fn place(set: &ConnSet, flow: &FlowKey, now: u32) -> Place {
    let mut empty = None;
    let mut oldest = 0;
    let mut oldest_age = 0;
    let mut way = 0;
    while way < CONN_WAYS {
        let s = &set[way];
        if s.key == *flow {
            return Place { way, evicts: false };
        }
        if s.entry.real_id == 0 {
            if empty.is_none() {
                empty = Some(way);
            }
        } else {
            let age = now.wrapping_sub(s.stamp);
            if way == 0 || age > oldest_age {
                oldest = way;
                oldest_age = age;
            }
        }
        way += 1;
    }
    match empty {
        Some(way) => Place { way, evicts: false },
        None => Place {
            way: oldest,
            evicts: true,
        },
    }
}

/// The slot `flow` gets when it is written with `entry` at `now`.
#[inline(always)]
pub const fn slot(flow: &FlowKey, entry: &ConnEntry, key_check: u32, now: u32) -> ConnSlot {
    ConnSlot {
        key: *flow,
        entry: *entry,
        check: slot_check(key_check, entry),
        stamp: now,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn flow(sport: u16) -> FlowKey {
        let v4 = |a: u32| core::net::IpAddr::from(a.to_be_bytes());
        FlowKey::new(v4(0x0a00_0002), sport, v4(0x0a00_0001), 80, 6)
    }

    fn entry(real_id: u32) -> ConnEntry {
        ConnEntry {
            real_id,
            real_gen: 7,
            vip_id: 3,
            seen: 1,
            vip_gen: 9,
        }
    }

    /// Writes `f` into `set` as the datapath does; returns whether it evicted.
    fn insert(set: &mut ConnSet, f: &FlowKey, e: &ConnEntry, now: u32) -> bool {
        let h = ConnHash::of(f, 0);
        let p = place(set, f, now);
        set[p.way] = slot(f, e, h.key_check, now);
        p.evicts
    }

    fn get(set: &ConnSet, f: &FlowKey) -> Option<ConnEntry> {
        find(set, f, ConnHash::of(f, 0).key_check).map(|w| set[w].entry)
    }

    #[test]
    fn sizes_round_up_to_a_power_of_two_of_sets() {
        assert_eq!(conn_sets(0), 1);
        assert_eq!(conn_sets(16), 4);
        assert_eq!(conn_sets(17), 8);
        assert_eq!(conn_sets(1 << 18), 1 << 16);
        assert_eq!(conn_sets(100_000), 32_768);
    }

    #[test]
    fn a_written_flow_is_found_and_others_are_not() {
        let mut set = ConnSet::default();
        assert!(!insert(&mut set, &flow(1), &entry(5), 10));
        assert_eq!(get(&set, &flow(1)), Some(entry(5)));
        assert_eq!(get(&set, &flow(2)), None);
        // Rewriting the same flow takes its own slot again.
        assert!(!insert(&mut set, &flow(1), &entry(6), 11));
        assert_eq!(get(&set, &flow(1)), Some(entry(6)));
        assert_eq!(set.iter().filter(|s| s.entry.real_id != 0).count(), 1);
    }

    #[test]
    fn a_full_set_evicts_its_least_recently_used_flow() {
        let mut set = ConnSet::default();
        for (i, now) in [(1, 100), (2, 101), (3, 102), (4, 103)] {
            assert!(!insert(&mut set, &flow(i), &entry(i as u32), now));
        }
        // Flow 1 used again (its stamp refreshed), so flow 2 is now the oldest.
        let w = find(&set, &flow(1), ConnHash::of(&flow(1), 0).key_check).unwrap();
        set[w].stamp = 104;
        assert!(insert(&mut set, &flow(5), &entry(5), 105));
        assert_eq!(get(&set, &flow(2)), None, "the least recently used left");
        for i in [1, 3, 4, 5] {
            assert_eq!(get(&set, &flow(i)), Some(entry(i as u32)), "flow {i}");
        }
    }

    #[test]
    fn ages_survive_the_stamp_wrapping() {
        let mut set = ConnSet::default();
        insert(&mut set, &flow(1), &entry(1), u32::MAX - 1); // oldest, before the wrap
        insert(&mut set, &flow(2), &entry(2), u32::MAX);
        insert(&mut set, &flow(3), &entry(3), 0);
        insert(&mut set, &flow(4), &entry(4), 1);
        insert(&mut set, &flow(5), &entry(5), 2);
        assert_eq!(get(&set, &flow(1)), None);
        assert!(get(&set, &flow(2)).is_some());
    }

    #[test]
    fn a_torn_slot_reads_as_a_miss() {
        // Two CPUs writing one slot at once: every mix of one flow's key with another's
        // entry or check, and every mix of two entries, must fail the check.
        let (a, b) = (flow(1), flow(2));
        let (ka, kb) = (ConnHash::of(&a, 0).key_check, ConnHash::of(&b, 0).key_check);
        let (sa, sb) = (slot(&a, &entry(5), ka, 1), slot(&b, &entry(6), kb, 1));
        let mut torn = [sa; 3];
        torn[0].entry = sb.entry; // a's key, b's entry, a's check
        torn[1].entry = sb.entry; // a's key, b's entry and check
        torn[1].check = sb.check;
        torn[2].check = sb.check; // a's key and entry, b's check
        for (i, t) in torn.iter().enumerate() {
            let mut set = ConnSet::default();
            set[0] = *t;
            assert_eq!(get(&set, &a), None, "torn variant {i}");
        }
        // Entries torn between two picks of the same flow (a ring change on two CPUs).
        let mut half = sa;
        half.entry.real_gen = 8;
        let mut set = ConnSet::default();
        set[0] = half;
        assert_eq!(get(&set, &a), None);
        // The packet count is rewritten in place and is not checked.
        set[0] = sa;
        set[0].entry.seen = 77;
        assert!(get(&set, &a).is_some());
    }

    #[test]
    fn the_check_separates_flows_of_one_set() {
        // Flows sharing a set (the same low hash bits) differ in their key checks.
        let mask = 0xff;
        let base = ConnHash::of(&flow(0), mask);
        let mut checks = std::collections::HashSet::new();
        for p in 0..60_000u16 {
            let h = ConnHash::of(&flow(p), mask);
            if h.set == base.set {
                checks.insert(h.key_check);
            }
        }
        assert!(checks.len() > 150, "{}", checks.len());
        assert_eq!(
            checks.len(),
            (0..60_000u16)
                .filter(|&p| ConnHash::of(&flow(p), mask).set == base.set)
                .count()
        );
    }
}
