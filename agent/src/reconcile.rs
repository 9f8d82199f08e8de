//! Applies a desired state to the datapath as a diff: VIPs whose backends and table size
//! are unchanged are not touched (their rings, flows and marks stay), changed VIPs get a
//! new ring switched in atomically, removed VIPs go; reals that leave have their marks
//! invalidated before their slots are cleared.

use marklb_common::{MAX_REALS, MAX_VIPS};

use crate::{
    balancer::{Balancer, RetiringReal, VipId},
    datapath::{Datapath, Result as DpResult},
    desired::{Desired, VipPlan},
    maglev,
    marks::MarkManager,
};

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<VipId>,
    pub changed: Vec<VipId>,
    /// VIPs a previous agent left, now claimed with their backends (rings kept when equal).
    pub adopted: Vec<VipId>,
    pub removed: Vec<VipId>,
    pub unchanged: usize,
    pub reals_retired: usize,
}

/// Checks that a plan fits the datapath's capacities before anything is changed, so a
/// plan that cannot be applied is rejected whole and the running state keeps serving.
pub fn check_capacity(lb: &Balancer, desired: &Desired) -> Result<(), String> {
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
    if need > lb.ring_capacity() as u64 {
        return Err(format!(
            "Maglev rings need {need} slots (sum of table sizes plus one being replaced) but the ring \
             storage has {}; use a smaller maglevTableSize or start the agent with a larger --ring-capacity",
            lb.ring_capacity()
        ));
    }
    Ok(())
}

/// Applies `desired` (which passed [`check_capacity`]).
pub fn apply(
    dp: &mut Datapath,
    lb: &mut Balancer,
    marks: &mut MarkManager,
    desired: &Desired,
) -> DpResult<ApplyReport> {
    let mut report = ApplyReport::default();
    let mut leaving: Vec<RetiringReal> = Vec::new();

    let stale: Vec<VipId> = lb
        .vip_ids()
        .filter(|v| !desired.vips.contains_key(v))
        .copied()
        .collect();
    for vip in stale {
        if let Some(vip_id) = lb.vip_stats_id(&vip) {
            // Established flows of the VIP stop with its generation; its marks go here.
            marks.invalidate_vip(dp, vip_id);
        }
        leaving.extend(lb.remove_vip(dp, &vip)?);
        report.removed.push(vip);
    }
    let mut todo = Vec::new();
    for (vip, plan) in &desired.vips {
        let current = lb.backends(vip);
        let same = current == Some(plan.backends.as_slice())
            && lb.table_size(vip) == Some(plan.table_size);
        if same {
            report.unchanged += 1;
            continue;
        }
        if lb.is_adopted(vip) {
            report.adopted.push(*vip);
        } else if current.is_some() {
            report.changed.push(*vip);
        } else {
            report.added.push(*vip);
        }
        todo.push((*vip, plan));
    }
    let tables = build_tables(&todo);
    // (VIP stats slot, real slot) pairs a changed VIP no longer lists.
    let mut dropped = Vec::new();
    for ((vip, plan), table) in todo.iter().zip(&tables) {
        if let (Some(old), Some(vip_id)) = (lb.backends(vip), lb.vip_stats_id(vip)) {
            for b in old
                .iter()
                .filter(|b| !plan.backends.iter().any(|n| n.addr == b.addr))
            {
                dropped.extend(lb.real_id(&b.addr).map(|r| (vip_id, r, b.addr)));
            }
        }
        leaving.extend(lb.set_vip_with_table(dp, *vip, &plan.backends, plan.table_size, table)?);
    }
    // A dropped real that other VIPs keep keeps its slot: that VIP's flows to it must move
    // all the same (their marks and connection-table entries go; the ring no longer has it).
    for (vip_id, real_id, addr) in dropped {
        if lb.real_id(&addr) == Some(real_id) {
            marks.invalidate_pair(dp, vip_id, real_id);
            dp.purge_conns(|_, c| c.vip_id == vip_id && c.real_id == real_id)?;
        }
    }
    // Reals a previous agent programmed that nothing claims now.
    leaving.extend(lb.unclaimed_reals());
    // Removed VIPs go first so their ring space is free for the rest. A real that only a
    // removed VIP used leaves even if a VIP added in this apply lists it: that VIP gets
    // it under a new slot (the removed VIP's flows are gone anyway).
    for r in &leaving {
        marks.invalidate_real(dp, r.id);
    }
    lb.retire(dp, &leaving)?;
    report.reals_retired = leaving.len();
    Ok(report)
}

/// Maglev tables of many VIPs, computed on every core (the tables are pure; only writing
/// them into the maps is sequential).
fn build_tables(todo: &[(VipId, &VipPlan)]) -> Vec<Vec<u32>> {
    let build = |p: &VipPlan| maglev::build_table(&p.backends, p.table_size);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 || todo.len() < 8 {
        return todo.iter().map(|(_, p)| build(p)).collect();
    }
    let chunk = todo.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = todo
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|(_, p)| build(p)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("Maglev table thread"))
            .collect()
    })
}
