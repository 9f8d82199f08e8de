//! Carrying a [`Plan`] out on the datapath: the thin effect layer under the pure diff.
//!
//! Order (each step keeps every packet on a valid real):
//! 1. reals that stay ([`Plan::reals_staying`]) are held, so they keep their slots while the
//!    VIPs around them change;
//! 2. removed VIPs lose their marks, then go (their ring space is free for the rest);
//! 3. written VIPs get a new ring switched in (Maglev tables built on every core first);
//! 4. (VIP, real) pairs that leave: that VIP's marks and connection entries to the real go,
//!    after the new ring no longer picks it;
//! 5. reals nothing lists: marks invalidated first, then their slots cleared.

use crate::{
    datapath::{Datapath, Result},
    desired::{Desired, VipPlan},
    maglev,
    marks::MarkManager,
    model::DatapathModel,
    plan::{self, Plan},
    vip::VipId,
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

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} VIPs added, {} changed, {} adopted, {} removed, {} unchanged, {} reals retired",
            self.added.len(),
            self.changed.len(),
            self.adopted.len(),
            self.removed.len(),
            self.unchanged,
            self.reals_retired
        )
    }
}

/// Plans and applies `desired` (which passed [`plan::check_capacity`]).
pub fn apply(
    dp: &mut Datapath,
    model: &mut DatapathModel,
    marks: &mut MarkManager,
    desired: &Desired,
) -> Result<ApplyReport> {
    let plan = plan::plan(model, desired);
    let retired = execute(dp, model, marks, desired, &plan)?;
    Ok(ApplyReport {
        added: plan.added,
        changed: plan.changed,
        adopted: plan.adopted,
        removed: plan.removed,
        unchanged: plan.unchanged,
        reals_retired: retired,
    })
}

/// Carries `plan` (computed for `desired` against `model`) out; returns how many reals were
/// retired.
pub fn execute(
    dp: &mut Datapath,
    model: &mut DatapathModel,
    marks: &mut MarkManager,
    desired: &Desired,
    plan: &Plan,
) -> Result<usize> {
    model.hold_reals(&plan.reals_staying);
    let mut leaving = Vec::new();
    let changed = (|| -> Result<()> {
        for vip in &plan.removed {
            if let Some(vip_id) = model.vip_stats_id(vip) {
                // Established flows of the VIP stop with its generation; its marks go here.
                marks.invalidate_vip(dp, vip_id);
            }
            leaving.extend(model.remove_vip(dp, vip)?);
        }
        let writes: Vec<(VipId, &VipPlan)> = plan
            .writes()
            .into_iter()
            .map(|v| (v, &desired.vips[&v]))
            .collect();
        let tables = build_tables(&writes);
        for ((vip, p), table) in writes.iter().zip(&tables) {
            leaving.extend(model.set_vip_with_table(dp, *vip, &p.backends, p.table_size, table)?);
        }
        for (vip, addr) in &plan.pairs_leaving {
            if let (Some(vip_id), Some(real_id)) = (model.vip_stats_id(vip), model.real_id(addr)) {
                marks.invalidate_pair(dp, vip_id, real_id);
                dp.purge_conns(|_, c| u32::from(c.vip_id) == vip_id && c.real_id == real_id)?;
            }
        }
        Ok(())
    })();
    leaving.extend(model.release_reals(&plan.reals_staying));
    // Reals a previous agent programmed that nothing claims now.
    leaving.extend(model.unclaimed_reals());
    for r in &leaving {
        marks.invalidate_real(dp, r.id);
    }
    model.retire(dp, &leaving)?;
    changed?;
    Ok(leaving.len())
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
