// SPDX-License-Identifier: GPL-2.0 OR MIT
//! The VIP address sets: which destination addresses carry a VIP, in an array of small
//! sets (`VIP_ADDR_SETS`) that the datapath reads without a hash-map lookup.
//!
//! Why: every packet asks "is this destination ours?" before anything else. A kernel hash
//! map answers it with a jhash of the 16-byte key, the bucket walk and a compare; measured,
//! that lookup was most of the parse step (28-31 ns of the new-flow path, README
//! "Benchmarks"). Here an address's set is fixed by a multiply-shift of its words, and the
//! datapath compares at most [`ADDR_WAYS`] addresses in one cache line.
//!
//! The kernel hash map `VIP_ADDRS` stays the authority (the agent's reference counts). A
//! set with more addresses than ways keeps the first ones and raises its `spill` flag: a
//! lookup that misses the ways of a spilling set asks the hash map. So every VIP address is
//! found, whatever the load; only a spilled one costs the hash lookup again.
//!
//! The agent rewrites a set whole with a map update while the datapath reads it. A set's
//! write never moves an address that stays (see [`plan`]), so a concurrent reader can only
//! misread the ways that change: it may miss the address being added or removed (the
//! packet is passed, as it was a moment before or will be a moment after) or see a torn mix
//! of it and zeros as some other address, which then merely takes the lookups of a VIP
//! address and finds no VIP (a false "ours" costs time, never a wrong real).

/// Addresses a set holds before it spills (three 16-byte addresses and the flags: one
/// 64-byte cache line).
pub const ADDR_WAYS: usize = 3;

/// Sets in `VIP_ADDR_SETS`: one per possible VIP address, so even a full table averages
/// one address a set (a set spills then with a probability of about 2%) and a typical
/// one, a few addresses, never does. A power of two: an address's set is a shift, no
/// division.
pub const ADDR_SETS: u32 = crate::MAX_VIP_ADDRS;
const _: () = assert!(ADDR_SETS.is_power_of_two());

/// One `VIP_ADDR_SETS` element.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrSet {
    /// Addresses in the datapath's word form (`addr_words`); all zero: a free way (no VIP
    /// address is all zero: the agent refuses the unspecified address).
    pub addrs: [[u32; 4]; ADDR_WAYS],
    /// Non-zero: more addresses belong here than the ways hold; a miss asks `VIP_ADDRS`.
    pub spill: u32,
    pub _pad: [u32; 3],
}
const _: () = assert!(core::mem::size_of::<AddrSet>() == 64);

/// The set of an address: its words folded to 64 bits and mixed by a multiply between two
/// xor-shifts (a plain multiply-shift left consecutive IPv4 addresses, which differ in
/// their first byte's word position, in 10% fewer sets than a uniform spread).
#[inline(always)]
pub const fn addr_set_of(addr: &[u32; 4]) -> u32 {
    let lo = addr[0] as u64 | ((addr[1] as u64) << 32);
    let hi = addr[2] as u64 | ((addr[3] as u64) << 32);
    let mut x = lo ^ hi.rotate_left(23);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x as u32 & (ADDR_SETS - 1)
}

/// Whether one of the set's ways holds `addr` (the spill flag is the caller's business).
/// The all-zero address is never held: it is what a free way says.
#[inline(always)]
pub fn holds(set: &AddrSet, addr: &[u32; 4]) -> bool {
    if addr[0] | addr[1] | addr[2] | addr[3] == 0 {
        return false;
    }
    let mut way = 0;
    while way < ADDR_WAYS {
        let a = &set.addrs[way];
        if (a[0] ^ addr[0]) | (a[1] ^ addr[1]) | (a[2] ^ addr[2]) | (a[3] ^ addr[3]) == 0 {
            return true;
        }
        way += 1;
    }
    false
}

/// The set that should replace `current` when exactly `desired` (the addresses of this
/// set, in any order) carry VIPs: an address that stays keeps its way, a way whose address
/// left is freed, a new address takes the lowest free way, and what does not fit spills.
/// All-zero addresses in `desired` are ignored.
pub fn plan(current: &AddrSet, desired: &[[u32; 4]]) -> AddrSet {
    let mut next = AddrSet::default();
    for (way, a) in current.addrs.iter().enumerate() {
        if *a != [0; 4] && desired.contains(a) {
            next.addrs[way] = *a;
        }
    }
    for a in desired {
        if *a == [0; 4] || next.addrs.contains(a) {
            continue;
        }
        match next.addrs.iter().position(|w| *w == [0; 4]) {
            Some(way) => next.addrs[way] = *a,
            None => next.spill = 1,
        }
    }
    next
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::HashSet, vec::Vec};

    use super::*;

    fn v4(a: u32) -> [u32; 4] {
        [a.to_be(), 0, 0, 0]
    }

    /// `n` IPv4 addresses that share one set.
    fn colliding(n: usize) -> Vec<[u32; 4]> {
        let set = addr_set_of(&v4(0x0a00_0001));
        (0x0a00_0001u32..)
            .map(v4)
            .filter(|a| addr_set_of(a) == set)
            .take(n)
            .collect()
    }

    #[test]
    fn addresses_spread_over_the_sets() {
        let mut sets = HashSet::new();
        for i in 0..1024u32 {
            sets.insert(addr_set_of(&v4(0x0a00_0000 + i)));
        }
        // 1,024 consecutive addresses into 4,096 sets: a uniform spread fills ~906
        // distinct sets (a plain multiply-shift filled 829).
        assert!(sets.len() > 880, "{} distinct sets", sets.len());
        let v6 = |i: u32| [0x2001_0db8u32.to_be(), 0, 0, i.to_be()];
        let sets6: HashSet<_> = (0..1024).map(|i| addr_set_of(&v6(i))).collect();
        assert!(sets6.len() > 880, "{} distinct sets", sets6.len());
    }

    #[test]
    fn a_planned_set_holds_its_addresses_and_nothing_else() {
        let addrs = colliding(4);
        let set = plan(&AddrSet::default(), &addrs[..2]);
        assert!(holds(&set, &addrs[0]) && holds(&set, &addrs[1]));
        assert!(!holds(&set, &addrs[2]));
        assert_eq!(set.spill, 0);
        // A free way is all zero; a packet to the unspecified address is not ours.
        assert!(!holds(&set, &[0; 4]));
    }

    #[test]
    fn addresses_beyond_the_ways_spill_and_come_back_when_a_way_frees() {
        let addrs = colliding(5);
        let full = plan(&AddrSet::default(), &addrs);
        assert_eq!(full.spill, 1);
        assert_eq!(full.addrs, [addrs[0], addrs[1], addrs[2]]);
        // addrs[1] leaves: its way goes to a spilled address, the others stay in place.
        let rest = [addrs[0], addrs[2], addrs[3], addrs[4]];
        let next = plan(&full, &rest);
        assert_eq!(next.addrs, [addrs[0], addrs[3], addrs[2]]);
        assert_eq!(next.spill, 1, "addrs[4] still spills");
        let fewer = plan(&next, &[addrs[2], addrs[3]]);
        assert_eq!(fewer.addrs, [[0; 4], addrs[3], addrs[2]]);
        assert_eq!(fewer.spill, 0);
    }

    #[test]
    fn an_address_that_stays_never_moves() {
        let addrs = colliding(3);
        let a = plan(&AddrSet::default(), &[addrs[0], addrs[1]]);
        let b = plan(&a, &[addrs[2], addrs[1]]);
        assert_eq!(b.addrs[1], addrs[1]);
        assert_eq!(b.addrs[0], addrs[2], "the freed way is reused");
        assert_eq!(
            plan(&b, &[addrs[1], addrs[2]]),
            b,
            "the same addresses: no change"
        );
    }
}
