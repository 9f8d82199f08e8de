// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Choosing the real of a flow: the VIP lookup, the connection table (established flows)
//! and the VIP's Maglev ring (new flows). No packet access here: the normal path and the
//! ICMP code both call in with a flow they parsed.

use marklb_common::{ConnEntry, Counter, FlowKey, RealDef, VipKey, VipMeta, hash::fold};

use crate::{
    conn,
    maps::{REALS, RINGS, VIP_GENS, VIPS},
};

/// The VIP serving `flow`: an exact (address, port, protocol) entry, else the address's
/// all-ports entry.
#[inline(always)]
pub fn vip_lookup(flow: &FlowKey) -> Option<&'static VipMeta> {
    let mut key = VipKey {
        addr_be: flow.dst_be,
        port_be: flow.dport_be,
        proto: flow.proto,
        _pad: 0,
    };
    if let Some(m) = unsafe { VIPS.get(key) } {
        return Some(m);
    }
    key.port_be = 0;
    unsafe { VIPS.get(key) }
}

/// A real chosen for a flow.
pub struct Pick {
    pub real_id: u32,
    pub real: &'static RealDef,
    /// Stats slot of the VIP.
    pub vip_id: u32,
    /// Chosen from the Maglev ring (a new flow) rather than the connection table.
    pub new: bool,
    /// Packets of the flow the normal path has seen, this one included (`ConnEntry::seen`);
    /// 1 for a new flow.
    pub seen: u16,
}

/// The real a live slot holds, if the slot is in use.
#[inline(always)]
fn live_real(real_id: u32) -> Option<&'static RealDef> {
    if real_id == 0 {
        return None;
    }
    match REALS.get(real_id) {
        Some(r) if r.generation != 0 => Some(r),
        _ => None,
    }
}

/// An established flow: the connection table names its real and VIP. No VIP lookup is
/// needed; an entry whose real or VIP has left (generation changed) does not count.
#[inline(always)]
pub fn established(flow: &FlowKey, hash: u64) -> Option<Pick> {
    live_entry(&conn::lookup(flow, hash)?.entry)
}

/// [`established`] for a packet of the flow itself: also counts it in the entry
/// (`ConnEntry::seen`), which decides when the flow raises its new-flow event, and marks
/// its slot used. Not atomic: two CPUs may lose an increment, which only moves the event
/// by a packet.
#[inline(always)]
pub fn established_packet(flow: &FlowKey, hash: u64) -> Option<Pick> {
    let s = conn::lookup(flow, hash)?;
    let mut pick = live_entry(&s.entry)?;
    let seen = pick.seen.wrapping_add(1);
    s.entry.seen = seen;
    conn::touch(s);
    pick.seen = seen;
    Some(pick)
}

/// The pick a connection-table entry stands for, if its real and VIP are still the ones
/// it was made for.
#[inline(always)]
fn live_entry(c: &ConnEntry) -> Option<Pick> {
    let real = live_real(c.real_id)?;
    if real.generation != c.real_gen {
        return None;
    }
    let vip_id = c.vip_id as u32;
    match VIP_GENS.get(vip_id) {
        Some(&g) if g != 0 && g == c.vip_gen => {}
        _ => return None,
    }
    Some(Pick {
        real_id: c.real_id,
        real,
        vip_id,
        new: false,
        seen: c.seen,
    })
}

/// Whether and how [`ring_pick`] records its choice in the connection table.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Not at all (ICMP errors, benchmark steps that stop before the write).
    No,
    /// Write the entry (a packet whose lookup just missed or found a stale entry).
    Insert,
    /// A SYN, which skipped the lookup: refresh a live entry that already says the same
    /// ([`conn::learn_syn`]), write otherwise.
    Syn,
}

/// A new flow: the VIP's Maglev ring chooses; `learn` records the choice in the
/// connection table. `hash` is the flow's `flow_hash64`, which the caller computed once
/// for the connection table and the ring.
#[inline(always)]
pub fn ring_pick(flow: &FlowKey, hash: u64, vip: &VipMeta, learn: Learn) -> Result<Pick, Counter> {
    if vip.ring_size == 0 {
        return Err(Counter::DropNoReal);
    }
    let idx = vip.ring_off.wrapping_add(fold(hash) % vip.ring_size);
    let Some(&pair) = RINGS.get(idx >> 1) else {
        return Err(Counter::DropNoReal);
    };
    let real_id = (pair >> ((idx & 1) << 5)) as u32;
    let Some(real) = live_real(real_id) else {
        return Err(Counter::DropNoReal);
    };
    if learn != Learn::No {
        let entry = new_entry(real_id, real, vip);
        if learn == Learn::Syn {
            conn::learn_syn(flow, hash, &entry);
        } else {
            conn::insert(flow, hash, &entry);
        }
    }
    Ok(Pick {
        real_id,
        real,
        vip_id: vip.vip_id,
        new: true,
        seen: 1,
    })
}

/// The connection-table entry of a flow the ring just gave to `real_id`.
#[inline(always)]
pub fn new_entry(real_id: u32, real: &RealDef, vip: &VipMeta) -> ConnEntry {
    ConnEntry {
        real_id,
        real_gen: real.generation,
        vip_id: vip.vip_id as u16,
        seen: 1,
        vip_gen: vip.generation,
    }
}
