//! The agent's side of the per-CPU event rings (`EVENT_SLOTS`, `EVENT_CURSORS`; the layout
//! and why: `marklb_common::event`): the reader that drains them through a mapping, and
//! the doorbell ring whose descriptor wakes it.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use marklb_common::{
    EVENT_CURSOR_HEAD, EVENT_CURSOR_TAIL, EVENT_SLOTS_PER_CPU, EventCursor, NewFlowEvent,
    event_check, event_slot, hash::flow_hash64,
};

use super::{Result, mapping::Mapping};

/// How long a slot whose check does not match may stay at the front of its ring before it
/// is skipped: long enough for a datapath still writing it (or, on a weakly ordered CPU,
/// for its stores to arrive), short against the consumer's 1 ms poll.
const UNFINISHED_GRACE: Duration = Duration::from_micros(100);

/// Reads new-flow events from every CPU's ring, in order within a CPU, CPUs in turn.
pub struct EventReader {
    slots: Mapping,
    cursors: Mapping,
    cpus: u32,
    /// The CPU to look at first (turns go round so no CPU's ring starves the others).
    next_cpu: u32,
    /// Each CPU's `head` as last read: the datapath's line is read again only once the
    /// events before it are consumed.
    heads_seen: Vec<u64>,
    /// A front slot whose check did not match, when first seen (cpu, position, time).
    unfinished: Option<(u32, u64, Instant)>,
    /// Slots skipped because their check never matched (torn, or never finished).
    skipped: u64,
    doorbell: RingBuf<MapData>,
    _maps: (MapData, MapData),
}

impl EventReader {
    /// Maps `slots` and `cursors` (of `cpus` rings) and takes the doorbell ring.
    pub(crate) fn new(
        slots: MapData,
        cursors: MapData,
        cpus: u32,
        doorbell: RingBuf<MapData>,
    ) -> Result<Self> {
        let slot_bytes = (cpus * EVENT_SLOTS_PER_CPU) as usize * size_of::<NewFlowEvent>();
        let cursor_bytes = cpus as usize * size_of::<EventCursor>();
        Ok(Self {
            slots: Mapping::new(slots.fd(), slot_bytes, false)?,
            cursors: Mapping::new(cursors.fd(), cursor_bytes, true)?,
            cpus,
            next_cpu: 0,
            heads_seen: vec![0; cpus as usize],
            unfinished: None,
            skipped: 0,
            doorbell,
            _maps: (slots, cursors),
        })
    }

    /// A CPU's head or tail word, shared with the datapath.
    fn cursor_word(&self, cpu: u32, offset: usize) -> &AtomicU64 {
        debug_assert!(cpu < self.cpus);
        let at = cpu as usize * size_of::<EventCursor>() + offset;
        // SAFETY: within the mapping (cpu < cpus), 8-byte aligned (pages, 128-byte cursors).
        unsafe { &*self.cursors.base::<u8>().add(at).cast::<AtomicU64>() }
    }

    /// The next event, if one is waiting (and the doorbell's records, which only wake).
    pub fn next_event(&mut self) -> Option<NewFlowEvent> {
        while self.doorbell.next().is_some() {}
        for turn in 0..self.cpus {
            let cpu = (self.next_cpu + turn) % self.cpus;
            if let Some(ev) = self.next_of(cpu) {
                self.next_cpu = (cpu + 1) % self.cpus;
                return Some(ev);
            }
        }
        None
    }

    /// The next event of `cpu`'s ring; skips slots whose check never matched.
    fn next_of(&mut self, cpu: u32) -> Option<NewFlowEvent> {
        let mut tail = self
            .cursor_word(cpu, EVENT_CURSOR_TAIL)
            .load(Ordering::Relaxed);
        let mut head = self.heads_seen[cpu as usize];
        // Nothing left before the copy, or a copy from before a restart's tail: read again.
        if head.wrapping_sub(tail).wrapping_sub(1) >= EVENT_SLOTS_PER_CPU as u64 {
            head = self
                .cursor_word(cpu, EVENT_CURSOR_HEAD)
                .load(Ordering::Acquire);
            self.heads_seen[cpu as usize] = head;
        }
        while tail != head {
            let ev = self.slot(event_slot(cpu, tail));
            let check = event_check(
                flow_hash64(&ev.flow),
                ev.vip_id,
                ev.real_id,
                ev.real_gen,
                ev.ts_ns,
                tail,
            );
            if check == ev.check {
                self.cursor_word(cpu, EVENT_CURSOR_TAIL)
                    .store(tail + 1, Ordering::Release);
                return Some(ev);
            }
            match self.unfinished {
                Some((c, pos, since)) if c == cpu && pos == tail => {
                    if since.elapsed() < UNFINISHED_GRACE {
                        return None;
                    }
                }
                _ => {
                    self.unfinished = Some((cpu, tail, Instant::now()));
                    return None;
                }
            }
            // Never finished: not an event (a lost one gets another chance, see
            // `marklb_common::event_due`).
            self.unfinished = None;
            self.skipped += 1;
            tail += 1;
            self.cursor_word(cpu, EVENT_CURSOR_TAIL)
                .store(tail, Ordering::Release);
        }
        None
    }

    /// A copy of slot `index` of the mapping.
    fn slot(&self, index: u32) -> NewFlowEvent {
        debug_assert!(index < self.cpus * EVENT_SLOTS_PER_CPU);
        // SAFETY: within the mapping; the datapath may be writing it (a torn copy fails the
        // check), hence volatile.
        unsafe { std::ptr::read_volatile(self.slots.base::<NewFlowEvent>().add(index as usize)) }
    }

    /// Slots skipped so far because their check never matched.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Events waiting in every CPU's ring.
    pub fn waiting(&self) -> u64 {
        (0..self.cpus)
            .map(|cpu| {
                let head = self
                    .cursor_word(cpu, EVENT_CURSOR_HEAD)
                    .load(Ordering::Acquire);
                let tail = self
                    .cursor_word(cpu, EVENT_CURSOR_TAIL)
                    .load(Ordering::Relaxed);
                head.wrapping_sub(tail)
            })
            .sum()
    }
}

/// For epoll / tokio `AsyncFd`: readable when the datapath rang the doorbell.
impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.doorbell.as_raw_fd()
    }
}
