//! The diff between what is programmed and what is desired (pure: no I/O, tested without
//! root). [`apply`](crate::apply) carries a [`Plan`] out.
//!
//! What a plan promises:
//! - a VIP whose backends and table size are unchanged is not touched (its ring, flows and
//!   marks stay); a VIP a previous agent left (adopted) is claimed with its backends;
//! - removed VIPs go first, so their ring space is free for the rest;
//! - a real that any desired VIP lists keeps its slot (and so its established flows),
//!   whichever VIPs list it before and after;
//! - a real that leaves one VIP but stays in others has that VIP's marks and connection
//!   entries to it removed (those flows move), listed in [`Plan::pairs_leaving`];
//! - a real no desired VIP lists is retired: its marks are invalidated, then its slot cleared.

use std::{collections::HashMap, net::IpAddr};

use marklb_common::{MAX_REALS, MAX_VIPS};

use crate::{desired::Desired, maglev::Backend, vip::VipId};

/// One programmed VIP, as the model of the datapath knows it.
#[derive(Clone, Copy, Debug)]
pub struct ProgrammedVip<'a> {
    pub backends: &'a [Backend],
    pub table_size: u32,
    /// Found in the maps at start; backends unknown until a configuration claims it.
    pub adopted: bool,
}

/// What is programmed now (implemented by the datapath model; by plain data in tests).
pub trait Programmed {
    /// Every programmed VIP.
    fn vip_ids(&self) -> Vec<VipId>;
    fn vip(&self, vip: &VipId) -> Option<ProgrammedVip<'_>>;
    /// Every real holding a slot (including adopted ones no VIP claimed yet).
    fn real_addrs(&self) -> Vec<IpAddr>;
    /// Whether the real holds a slot.
    fn has_real(&self, addr: &IpAddr) -> bool;
    /// How many programmed VIPs list the real (0: adopted, not claimed yet, or no slot).
    fn real_refs(&self, addr: &IpAddr) -> u32;
    /// Slots of the Maglev ring storage.
    fn ring_capacity(&self) -> u32;
}

/// What an apply changes, in the order it is carried out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// VIPs that go, first.
    pub removed: Vec<VipId>,
    /// VIPs written (new ring switched in), in VIP order: new ones,
    pub added: Vec<VipId>,
    /// ... ones whose backends or table size changed,
    pub changed: Vec<VipId>,
    /// ... and ones a previous agent left, now claimed with their backends.
    pub adopted: Vec<VipId>,
    pub unchanged: usize,
    /// (VIP, real) pairs: the real leaves that (changed) VIP but other VIPs keep it.
    pub pairs_leaving: Vec<(VipId, IpAddr)>,
    /// Reals no desired VIP lists: retired last.
    pub reals_retired: Vec<IpAddr>,
    /// Programmed reals a removed or rewritten VIP lists and some desired VIP still lists:
    /// held throughout, so they keep their slots.
    pub reals_staying: Vec<IpAddr>,
}

impl Plan {
    /// The VIPs to write, in VIP order.
    pub fn writes(&self) -> Vec<VipId> {
        let mut w: Vec<VipId> = self
            .added
            .iter()
            .chain(&self.changed)
            .chain(&self.adopted)
            .copied()
            .collect();
        w.sort();
        w
    }

    /// Whether applying it changes nothing.
    pub fn is_noop(&self) -> bool {
        self.removed.is_empty()
            && self.writes().is_empty()
            && self.pairs_leaving.is_empty()
            && self.reals_retired.is_empty()
    }
}

/// The plan that turns `now` into `desired`. Its cost follows what changed, not the size of
/// the state: reals are counted only where a VIP is added, changed or removed.
pub fn plan(now: &impl Programmed, desired: &Desired) -> Plan {
    let mut p = Plan::default();
    // Change of each touched real's count of listing VIPs.
    let mut delta: HashMap<IpAddr, i64> = HashMap::new();
    let mut add = |a: IpAddr, d: i64| *delta.entry(a).or_default() += d;
    let mut removed: Vec<VipId> = now
        .vip_ids()
        .into_iter()
        .filter(|v| !desired.vips.contains_key(v))
        .collect();
    removed.sort();
    for vip in &removed {
        for b in now.vip(vip).map_or(&[][..], |v| v.backends) {
            add(b.addr, -1);
        }
    }
    p.removed = removed;
    let mut dropped_pairs = Vec::new();
    for (vip, want) in &desired.vips {
        let Some(cur) = now.vip(vip) else {
            p.added.push(*vip);
            want.backends.iter().for_each(|b| add(b.addr, 1));
            continue;
        };
        if cur.backends == want.backends.as_slice() && cur.table_size == want.table_size {
            p.unchanged += 1;
            continue;
        }
        if cur.adopted {
            p.adopted.push(*vip);
        } else {
            p.changed.push(*vip);
        }
        for b in cur.backends {
            add(b.addr, -1);
            if !want.backends.iter().any(|n| n.addr == b.addr) {
                dropped_pairs.push((*vip, b.addr));
            }
        }
        want.backends.iter().for_each(|b| add(b.addr, 1));
    }
    let listed_after = |a: &IpAddr| now.real_refs(a) as i64 + delta.get(a).copied().unwrap_or(0);
    // A real dropped by one VIP but listed by others: that VIP's flows to it move.
    p.pairs_leaving = dropped_pairs
        .into_iter()
        .filter(|(_, a)| listed_after(a) > 0)
        .collect();
    // Touched reals with a slot: those still listed are held, the others retire; adopted
    // reals nothing claims (listed by no VIP now) retire as well.
    let mut touched: Vec<IpAddr> = delta.keys().copied().collect();
    touched.extend(
        now.real_addrs()
            .into_iter()
            .filter(|a| now.real_refs(a) == 0),
    );
    touched.sort();
    touched.dedup();
    for a in touched {
        if !now.has_real(&a) {
            continue;
        }
        if listed_after(&a) > 0 {
            p.reals_staying.push(a);
        } else {
            p.reals_retired.push(a);
        }
    }
    p
}

/// Checks that `desired` fits the datapath's capacities before anything is changed, so a
/// state that cannot be applied is refused whole and the running one keeps serving.
pub fn check_capacity(now: &impl Programmed, desired: &Desired) -> Result<(), String> {
    if desired.vips.len() > MAX_VIPS as usize {
        return Err(format!(
            "{} VIPs exceed the datapath's {MAX_VIPS}",
            desired.vips.len()
        ));
    }
    let reals = desired.real_count();
    if reals >= MAX_REALS as usize {
        return Err(format!(
            "{reals} reals exceed the datapath's {}",
            MAX_REALS - 1
        ));
    }
    // Rings are replaced one at a time: the plan plus the largest ring must fit.
    let largest = desired
        .vips
        .values()
        .map(|v| v.table_size as u64)
        .max()
        .unwrap_or(0);
    let need = desired.ring_slots() + largest;
    if need > now.ring_capacity() as u64 {
        return Err(format!(
            "Maglev rings need {need} slots (sum of table sizes plus one being replaced) but the ring \
             storage has {}; use a smaller maglevTableSize or start the agent with a larger --ring-capacity",
            now.ring_capacity()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
