//! The connection table seen from user space: the datapath's 4-way sets
//! (`marklb_common::conn`) through a shared mapping of the mmapable `CONN_TABLE`, so a
//! lookup is a set's four slots and a count or purge walks memory, not a syscall per entry.
//!
//! The datapath writes the sets concurrently and without locks. Every read here copies a
//! slot once (volatile) and takes it only if its check word says key and entry were written
//! together for that key, as the datapath's own lookups do. A purge zeroes the slots it
//! selected; if the datapath rewrote one of them for another flow in between, that flow is
//! picked from its Maglev ring again on its next packet (the same real unless the ring
//! changed), as after an eviction.

use std::os::fd::AsFd;

use marklb_common::{
    ConnEntry, ConnHash, ConnSet, ConnSlot, FlowKey,
    conn::{CONN_WAYS, find, slot_check},
};

use super::{DatapathError, Result, mapping::Mapping};

/// A mapping of `CONN_TABLE`.
pub struct ConnTable {
    /// Written through &mut self only, and only if `writable`.
    map: Mapping,
    count: u32,
    writable: bool,
}

impl ConnTable {
    /// Maps the table of `sets` sets (the map's max_entries) behind `fd`; read-only unless
    /// `writable` (`marklb-agent status` writes nothing).
    pub(crate) fn map(fd: &impl AsFd, sets: u32, writable: bool) -> Result<Self> {
        if !sets.is_power_of_two() {
            return Err(DatapathError::Capacity(format!(
                "the connection table has {sets} sets, not a power of two"
            )));
        }
        let map = Mapping::new(fd, sets as usize * size_of::<ConnSet>(), writable)?;
        Ok(Self {
            map,
            count: sets,
            writable,
        })
    }

    /// Slot `way` of set `set` in the mapping.
    fn slot_ptr(&self, set: u32, way: usize) -> *mut ConnSlot {
        debug_assert!(set < self.count && way < CONN_WAYS);
        unsafe {
            self.map
                .base::<ConnSet>()
                .add(set as usize)
                .cast::<ConnSlot>()
                .add(way)
        }
    }

    /// Sets of the table (a power of two).
    pub fn sets(&self) -> u32 {
        self.count
    }

    /// Flows the table can hold.
    pub fn capacity(&self) -> u32 {
        self.count * CONN_WAYS as u32
    }

    fn mask(&self) -> u32 {
        self.count - 1
    }

    /// A copy of set `i` (below `sets()`), each slot read once.
    fn read_set(&self, i: u32) -> ConnSet {
        std::array::from_fn(|w| unsafe { std::ptr::read_volatile(self.slot_ptr(i, w)) })
    }

    /// Whether `s` holds a valid entry for its own key.
    fn valid(&self, s: &ConnSlot) -> bool {
        s.entry.real_id != 0
            && s.check == slot_check(ConnHash::of(&s.key, self.mask()).key_check, &s.entry)
    }

    /// The entry the datapath holds for `flow`.
    pub fn get(&self, flow: &FlowKey) -> Option<ConnEntry> {
        let h = ConnHash::of(flow, self.mask());
        let set = self.read_set(h.set);
        find(&set, flow, h.key_check).map(|w| set[w].entry)
    }

    /// Every valid entry, in set order.
    pub fn entries(&self) -> impl Iterator<Item = (FlowKey, ConnEntry)> + '_ {
        (0..self.count).flat_map(move |i| {
            self.read_set(i)
                .into_iter()
                .filter(|s| self.valid(s))
                .map(|s| (s.key, s.entry))
        })
    }

    /// Valid entries.
    pub fn len(&self) -> usize {
        self.entries().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Empties the slots of the valid entries `matches` selects; returns how many.
    pub fn remove_where(&mut self, matches: impl Fn(&FlowKey, &ConnEntry) -> bool) -> usize {
        assert!(self.writable, "the connection table was mapped read-only");
        let mut removed = 0;
        for i in 0..self.count {
            let set = self.read_set(i);
            for (w, s) in set.iter().enumerate() {
                if self.valid(s) && matches(&s.key, &s.entry) {
                    unsafe { std::ptr::write_volatile(self.slot_ptr(i, w), ConnSlot::default()) };
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// Raw slots, for tests and diagnostics that must see or make what two CPUs writing one
/// slot at once could leave behind.
impl ConnTable {
    /// Where `flow`'s valid entry is (set, way) and the slot as read.
    pub fn raw_slot(&self, flow: &FlowKey) -> Option<(u32, usize, ConnSlot)> {
        let h = ConnHash::of(flow, self.mask());
        let set = self.read_set(h.set);
        find(&set, flow, h.key_check).map(|w| (h.set, w, set[w]))
    }

    /// Overwrites one slot as it is, check word included.
    pub fn overwrite_slot(&mut self, set: u32, way: usize, slot: ConnSlot) {
        assert!(
            set < self.count && way < CONN_WAYS,
            "slot {set}/{way} out of range"
        );
        assert!(self.writable, "the connection table was mapped read-only");
        unsafe { std::ptr::write_volatile(self.slot_ptr(set, way), slot) };
    }
}
