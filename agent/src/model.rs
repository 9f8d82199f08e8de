//! The model of what is programmed: VIPs, reals and Maglev rings as the datapath holds them,
//! kept in step with the maps by the calls that write them.
//!
//! Invariants that keep every packet on a valid real while things change:
//! - a VIP's ring is written into a fresh region and switched in with one VIP-map update
//!   (hash map updates replace the whole value), then the old region is freed;
//! - a real's slot is cleared only after no ring references it, and cleared slots get a
//!   new generation when reused, so connection-table entries and marks that remember the
//!   old generation can never reach whoever holds the slot next;
//! - a real that is still listed (even drained, weight 0) keeps its slot, so established
//!   flows to it keep their real.

use std::{collections::HashMap, net::IpAddr};

use marklb_common::{MAX_REALS, MAX_VIPS, REAL_F_IPV6, RealDef, VipMeta, addr_words, words_addr};

use crate::{
    datapath::{Datapath, DatapathError, Result},
    maglev::{self, Backend},
    plan::{Programmed, ProgrammedVip},
    ring_alloc::RingAllocator,
    vip::VipId,
};

/// A real whose last reference went away: its slot is cleared by [`DatapathModel::retire`]
/// once its marks are invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetiringReal {
    pub addr: IpAddr,
    pub id: u32,
    pub generation: u32,
}

#[derive(Clone, Debug)]
struct RealSlot {
    id: u32,
    generation: u32,
    refs: u32,
}

#[derive(Clone, Debug)]
struct VipState {
    vip_id: u32,
    generation: u32,
    /// Ring region (offset, size); None when the VIP has no live backend.
    ring: Option<(u32, u32)>,
    backends: Vec<Backend>,
    table_size: u32,
    /// Found in the maps at start (backends unknown until the configuration claims it).
    adopted: bool,
}

/// User-space model of what is programmed, kept in step with the maps.
#[derive(Debug)]
pub struct DatapathModel {
    reals: HashMap<IpAddr, RealSlot>,
    free_real_ids: Vec<u32>,
    /// Last generation handed to a real or VIP slot (one counter serves both).
    last_generation: u32,
    vips: HashMap<VipId, VipState>,
    free_vip_ids: Vec<u32>,
    rings: RingAllocator,
}

impl DatapathModel {
    /// The model of an empty datapath.
    pub fn new(dp: &Datapath) -> Self {
        Self {
            reals: HashMap::new(),
            // Popped from the end: hand out low ids first. Id 0 is never used.
            free_real_ids: (1..MAX_REALS.min(dp.reals_capacity())).rev().collect(),
            last_generation: 0,
            vips: HashMap::new(),
            free_vip_ids: (0..MAX_VIPS).rev().collect(),
            rings: RingAllocator::new(dp.ring_capacity()),
        }
    }

    /// Rebuilds the model from a running datapath's maps (a restarted agent): real slots
    /// keep their ids and generations, VIPs their stats slots, generations and rings, so
    /// established flows and marks stay valid. Backends of adopted VIPs are unknown until
    /// the configuration is applied again; reals no VIP claims by then are released by
    /// [`DatapathModel::unclaimed_reals`].
    pub fn adopt(dp: &Datapath) -> Result<Self> {
        let mut lb = Self::new(dp);
        let mut used_ids = Vec::new();
        for id in 1..dp.reals_capacity() {
            let def = dp.real(id)?;
            if def.generation == 0 {
                continue;
            }
            let addr = words_addr(&def.addr_be, def.flags & REAL_F_IPV6 != 0);
            lb.reals.insert(
                addr,
                RealSlot {
                    id,
                    generation: def.generation,
                    refs: 0,
                },
            );
            lb.last_generation = lb.last_generation.max(def.generation);
            used_ids.push(id);
        }
        lb.free_real_ids.retain(|id| !used_ids.contains(id));
        let mut regions = Vec::new();
        let mut used_vips = Vec::new();
        for (key, meta) in dp.vips()? {
            let v6 = key.addr_be[1..].iter().any(|w| *w != 0);
            let vip = VipId {
                addr: words_addr(&key.addr_be, v6),
                port: u16::from_be(key.port_be),
                proto: key.proto,
            };
            let ring = (meta.ring_size > 0).then_some((meta.ring_off, meta.ring_size));
            regions.extend(ring);
            used_vips.push(meta.vip_id);
            lb.last_generation = lb.last_generation.max(meta.generation);
            lb.vips.insert(
                vip,
                VipState {
                    vip_id: meta.vip_id,
                    generation: meta.generation,
                    ring,
                    backends: Vec::new(),
                    table_size: meta.ring_size,
                    adopted: true,
                },
            );
        }
        lb.free_vip_ids.retain(|id| !used_vips.contains(id));
        lb.rings = RingAllocator::from_used(dp.ring_capacity(), &regions).ok_or_else(|| {
            DatapathError::Capacity("pinned VIP rings overlap or exceed the ring storage".into())
        })?;
        Ok(lb)
    }

    /// Adds a reference to each of these programmed reals, so they keep their slots while
    /// the VIPs that list them change (an apply holds the reals that stay).
    pub fn hold_reals(&mut self, addrs: &[IpAddr]) {
        for a in addrs {
            if let Some(slot) = self.reals.get_mut(a) {
                slot.refs += 1;
            }
        }
    }

    /// Drops the references [`DatapathModel::hold_reals`] added; returns the reals left with
    /// none (pass them to [`DatapathModel::retire`]).
    pub fn release_reals(&mut self, addrs: &[IpAddr]) -> Vec<RetiringReal> {
        addrs.iter().filter_map(|a| self.release_real(a)).collect()
    }

    /// Adopted reals that no programmed VIP lists: they leave (pass to [`DatapathModel::retire`]).
    pub fn unclaimed_reals(&mut self) -> Vec<RetiringReal> {
        let gone: Vec<IpAddr> = self
            .reals
            .iter()
            .filter(|(_, s)| s.refs == 0)
            .map(|(a, _)| *a)
            .collect();
        gone.into_iter()
            .filter_map(|addr| {
                self.reals.remove(&addr).map(|s| RetiringReal {
                    addr,
                    id: s.id,
                    generation: s.generation,
                })
            })
            .collect()
    }

    /// Every programmed real: address -> slot id.
    pub fn real_ids(&self) -> impl Iterator<Item = (&IpAddr, u32)> {
        self.reals.iter().map(|(a, s)| (a, s.id))
    }

    /// Free ring storage slots.
    pub fn ring_free(&self) -> u64 {
        self.rings.free_entries()
    }

    pub fn ring_capacity(&self) -> u32 {
        self.rings.capacity()
    }

    pub fn vip_count(&self) -> usize {
        self.vips.len()
    }

    pub fn real_count(&self) -> usize {
        self.reals.len()
    }

    /// The slot id of a real, if it is programmed.
    pub fn real_id(&self, addr: &IpAddr) -> Option<u32> {
        self.reals.get(addr).map(|r| r.id)
    }

    /// The stats slot of a VIP, if it is programmed.
    pub fn vip_stats_id(&self, vip: &VipId) -> Option<u32> {
        self.vips.get(vip).map(|v| v.vip_id)
    }

    pub fn vip_ids(&self) -> impl Iterator<Item = &VipId> {
        self.vips.keys()
    }

    pub fn backends(&self, vip: &VipId) -> Option<&[Backend]> {
        self.vips.get(vip).map(|v| v.backends.as_slice())
    }

    fn next_generation(&mut self) -> u32 {
        self.last_generation = self.last_generation.wrapping_add(1).max(1);
        self.last_generation
    }

    fn acquire_real(&mut self, dp: &mut Datapath, addr: IpAddr) -> Result<u32> {
        if let Some(slot) = self.reals.get_mut(&addr) {
            slot.refs += 1;
            return Ok(slot.id);
        }
        let id = self
            .free_real_ids
            .pop()
            .ok_or_else(|| DatapathError::Capacity(format!("more than {} reals", MAX_REALS - 1)))?;
        let generation = self.next_generation();
        let def = RealDef {
            addr_be: addr_words(addr),
            flags: if addr.is_ipv6() { REAL_F_IPV6 } else { 0 },
            generation,
        };
        dp.reset_stats(None, Some(id))?;
        dp.set_real(id, &def)?;
        self.reals.insert(
            addr,
            RealSlot {
                id,
                generation,
                refs: 1,
            },
        );
        Ok(id)
    }

    /// Drops one reference; returns the real if that was the last one.
    fn release_real(&mut self, addr: &IpAddr) -> Option<RetiringReal> {
        let slot = self.reals.get_mut(addr)?;
        slot.refs -= 1;
        if slot.refs > 0 {
            return None;
        }
        let slot = self.reals.remove(addr)?;
        Some(RetiringReal {
            addr: *addr,
            id: slot.id,
            generation: slot.generation,
        })
    }

    /// Clears the slots of reals that left (after their marks were invalidated): packets of
    /// flows that still point at them take the normal path and get a current real.
    pub fn retire(&mut self, dp: &mut Datapath, leaving: &[RetiringReal]) -> Result<()> {
        for r in leaving {
            dp.set_real(r.id, &RealDef::default())?;
            self.free_real_ids.push(r.id);
        }
        Ok(())
    }

    /// Programs a VIP with these backends (new, or replacing its previous backends) and
    /// returns the reals no VIP uses any more (pass them to [`DatapathModel::retire`]).
    pub fn set_vip(
        &mut self,
        dp: &mut Datapath,
        vip: VipId,
        backends: &[Backend],
        table_size: u32,
    ) -> Result<Vec<RetiringReal>> {
        if !marklb_crds::is_prime(table_size) {
            return Err(DatapathError::Capacity(format!(
                "Maglev table size {table_size} is not prime"
            )));
        }
        let table = maglev::build_table(backends, table_size);
        self.set_vip_with_table(dp, vip, backends, table_size, &table)
    }

    /// [`DatapathModel::set_vip`] with the Maglev table (`maglev::build_table(backends,
    /// table_size)`) computed by the caller, e.g. for many VIPs in parallel.
    pub fn set_vip_with_table(
        &mut self,
        dp: &mut Datapath,
        vip: VipId,
        backends: &[Backend],
        table_size: u32,
        table: &[u32],
    ) -> Result<Vec<RetiringReal>> {
        if !marklb_crds::is_prime(table_size) {
            return Err(DatapathError::Capacity(format!(
                "Maglev table size {table_size} is not prime"
            )));
        }
        let existing = self.vips.get(&vip).cloned();
        let (vip_id, generation) = match &existing {
            Some(s) => (s.vip_id, s.generation),
            None => {
                let id = *self
                    .free_vip_ids
                    .last()
                    .ok_or_else(|| DatapathError::Capacity(format!("more than {MAX_VIPS} VIPs")))?;
                (id, self.next_generation())
            }
        };

        // New references first, so a real in both the old and new lists keeps its slot.
        let mut ids = Vec::with_capacity(backends.len());
        for b in backends {
            ids.push(self.acquire_real(dp, b.addr)?);
        }
        let ring_ids: Vec<u32> = table.iter().map(|&i| ids[i as usize]).collect();
        // An identical ring (adopted after a restart, or a weight-only no-op) stays in place.
        let current = existing.as_ref().and_then(|s| s.ring);
        let unchanged = match current {
            Some((off, len)) => len == table_size && dp.read_ring(off, len) == ring_ids,
            None => ring_ids.is_empty(),
        };
        let ring = if unchanged {
            current
        } else if ring_ids.is_empty() {
            None
        } else {
            let ring = ring_ids;
            let off = self.rings.alloc(table_size).ok_or_else(|| {
                DatapathError::Capacity(format!(
                    "ring storage full: {} free entries, {table_size} needed",
                    self.rings.free_entries()
                ))
            })?;
            dp.write_ring(off, &ring)?;
            Some((off, table_size))
        };
        let meta = VipMeta {
            vip_id,
            ring_off: ring.map_or(0, |r| r.0),
            ring_size: ring.map_or(0, |r| r.1),
            generation,
        };
        let key = vip.key();
        if existing.is_none() {
            self.free_vip_ids.pop();
            dp.reset_stats(Some(vip_id), None)?;
            dp.set_vip_gen(vip_id, generation)?;
        }
        dp.set_vip(&key, &meta)?;
        if existing.is_none() {
            let refs = dp.vip_addr_refs(&key.addr_be);
            dp.set_vip_addr_refs(&key.addr_be, refs + 1)?;
        }

        let mut leaving = Vec::new();
        if let Some(old) = existing {
            if let Some((off, len)) = old.ring.filter(|_| !unchanged) {
                self.rings.free(off, len);
            }
            for b in &old.backends {
                leaving.extend(self.release_real(&b.addr));
            }
        }
        self.vips.insert(
            vip,
            VipState {
                vip_id,
                generation,
                ring,
                backends: backends.to_vec(),
                table_size,
                adopted: false,
            },
        );
        Ok(leaving)
    }

    /// Removes a VIP; returns the reals no VIP uses any more.
    pub fn remove_vip(&mut self, dp: &mut Datapath, vip: &VipId) -> Result<Vec<RetiringReal>> {
        let Some(state) = self.vips.remove(vip) else {
            return Ok(Vec::new());
        };
        let key = vip.key();
        dp.remove_vip(&key)?;
        // Established flows of the VIP stop here: their entries name an old generation.
        dp.set_vip_gen(state.vip_id, 0)?;
        let refs = dp.vip_addr_refs(&key.addr_be);
        dp.set_vip_addr_refs(&key.addr_be, refs.saturating_sub(1))?;
        if let Some((off, len)) = state.ring {
            self.rings.free(off, len);
        }
        self.free_vip_ids.push(state.vip_id);
        Ok(state
            .backends
            .iter()
            .filter_map(|b| self.release_real(&b.addr))
            .collect())
    }

    /// Whether a VIP was adopted from a previous agent and not yet claimed by a config.
    pub fn is_adopted(&self, vip: &VipId) -> bool {
        self.vips.get(vip).is_some_and(|v| v.adopted)
    }

    /// The Maglev table size a VIP was programmed with.
    pub fn table_size(&self, vip: &VipId) -> Option<u32> {
        self.vips.get(vip).map(|v| v.table_size)
    }
}

impl Programmed for DatapathModel {
    fn vip_ids(&self) -> Vec<VipId> {
        self.vips.keys().copied().collect()
    }

    fn vip(&self, vip: &VipId) -> Option<ProgrammedVip<'_>> {
        self.vips.get(vip).map(|v| ProgrammedVip {
            backends: &v.backends,
            table_size: v.table_size,
            adopted: v.adopted,
        })
    }

    fn real_addrs(&self) -> Vec<IpAddr> {
        self.reals.keys().copied().collect()
    }

    fn has_real(&self, addr: &IpAddr) -> bool {
        self.reals.contains_key(addr)
    }

    fn real_refs(&self, addr: &IpAddr) -> u32 {
        self.reals.get(addr).map_or(0, |r| r.refs)
    }

    fn ring_capacity(&self) -> u32 {
        self.rings.capacity()
    }
}
