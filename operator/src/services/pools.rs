//! The pools as the allocator sees them, and each pool's own status, without I/O.
//!
//! A pool is usable when its spec validates and none of its blocks overlaps a block of an
//! older pool (creation time, then name): the older keeps the addresses, the newer reports
//! `Valid=False, Overlap` naming it and hands out nothing (two pools offering one address
//! could give it to two Services). A pool's status counts distinct addresses in use and
//! what is left per family; its `Valid` condition moves its transition time only on a flip.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use marklb_crds::conditions::{ConditionStatus, set_condition};
use marklb_crds::pool::{self, AddressBlock, Family, PoolAllocation};
use marklb_crds::{LoadBalancerIPPool, LoadBalancerIPPoolStatus};

use super::alloc::PoolView;

fn age(p: &LoadBalancerIPPool) -> (Option<Time>, String) {
    (p.metadata.creation_timestamp.clone(), p.name_any())
}

/// Every pool as the allocator sees it: usable, or why not.
pub fn views(pools: &[&LoadBalancerIPPool]) -> Vec<PoolView> {
    let mut sorted: Vec<&LoadBalancerIPPool> = pools.to_vec();
    sorted.sort_by_key(|p| age(p));
    let mut out: Vec<PoolView> = Vec::new();
    for p in sorted {
        let mut view = PoolView::new(&p.name_any(), p.spec.clone());
        if let Ok(blocks) = &view.usable {
            let overlap = out.iter().find_map(|older| {
                let theirs = older.usable.as_ref().ok()?;
                blocks
                    .iter()
                    .find_map(|b| theirs.iter().find(|t| t.overlaps(b)).map(|t| (b, t)))
                    .map(|(b, t)| format!("{b} overlaps {t} of older pool {}", older.name))
            });
            if let Some(why) = overlap {
                view.usable = Err(why);
            }
        }
        out.push(view);
    }
    out
}

/// Addresses left in `blocks` of `family` once `used` are taken.
fn left(
    blocks: &[AddressBlock],
    family: Family,
    avoid_buggy: bool,
    used: &BTreeSet<IpAddr>,
) -> u128 {
    let total: u128 = blocks
        .iter()
        .filter(|b| b.family() == family)
        .fold(0u128, |sum, b| sum.saturating_add(b.usable(avoid_buggy)));
    let taken = used
        .iter()
        .filter(|a| {
            Family::of(**a) == family
                && blocks.iter().any(|b| b.contains(**a))
                && !(avoid_buggy && pool::addresses::is_buggy(**a))
        })
        .count() as u128;
    total.saturating_sub(taken)
}

/// The status of `pool` (seen as `view`) with ledger `allocations`.
pub fn status(
    pool: &LoadBalancerIPPool,
    view: &PoolView,
    allocations: Vec<PoolAllocation>,
    now: Time,
) -> LoadBalancerIPPoolStatus {
    let mut status = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    status.observed_generation = generation;
    let used: BTreeSet<IpAddr> = allocations
        .iter()
        .filter_map(|a| a.address.parse().ok())
        .collect();
    status.in_use = u32::try_from(used.len()).unwrap_or(u32::MAX);
    let (valid, reason, message) = match &view.usable {
        Ok(_) => (true, pool::reason::VALID, String::new()),
        Err(why) if pool.spec.validate().is_err() => {
            (false, pool::reason::INVALID_SPEC, why.clone())
        }
        Err(why) => (false, pool::reason::OVERLAP, why.clone()),
    };
    status.available = match &view.usable {
        Ok(blocks) => {
            let parts: Vec<String> = [Family::V4, Family::V6]
                .into_iter()
                .filter(|f| blocks.iter().any(|b| b.family() == *f))
                .map(|f| format!("{f} {}", left(blocks, f, pool.spec.avoid_buggy_ips, &used)))
                .collect();
            Some(parts.join(", "))
        }
        Err(_) => Some("none (not valid)".into()),
    };
    status.allocations = allocations;
    set_condition(
        &mut status.conditions,
        pool::VALID,
        ConditionStatus::from(valid),
        reason,
        &message,
        generation,
        now,
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::at;
    use crate::services::fixtures::pool;

    fn entry(address: &str, service: &str) -> PoolAllocation {
        PoolAllocation {
            address: address.into(),
            namespace: "shop".into(),
            service: service.into(),
            uid: format!("uid-{service}"),
            sharing_key: None,
            ports: vec!["TCP/80".into()],
        }
    }

    #[test]
    fn the_newer_of_two_overlapping_pools_is_not_usable() {
        let old = pool("old", "addresses: [10.0.0.0/24]");
        let mut new = pool("new", "addresses: ['fd00::/64', 10.0.0.128/25]");
        new.metadata.creation_timestamp = Some(at(20));
        let apart = pool("apart", "addresses: [10.0.1.0/24]");
        let views = views(&[&new, &apart, &old]);
        let names: Vec<(&str, bool)> = views
            .iter()
            .map(|v| (v.name.as_str(), v.usable.is_ok()))
            .collect();
        assert_eq!(names, [("apart", true), ("old", true), ("new", false)]);
        assert_eq!(
            views[2].usable.as_ref().unwrap_err(),
            "10.0.0.128-10.0.0.255 overlaps 10.0.0.0-10.0.0.255 of older pool old"
        );
        let s = status(&new, &views[2], vec![], at(30));
        let valid = &s.conditions[0];
        assert_eq!(
            (valid.status.as_str(), valid.reason.as_str()),
            ("False", "Overlap")
        );
    }

    #[test]
    fn counts_distinct_addresses_and_what_is_left_per_family() {
        let p = pool(
            "p",
            "addresses: [10.0.0.0/24, 'fd00::/126']\navoidBuggyIPs: true",
        );
        let v = &views(&[&p])[0];
        let s = status(
            &p,
            v,
            vec![
                entry("10.0.0.1", "a"),
                entry("10.0.0.1", "b"),
                entry("fd00::1", "a"),
            ],
            at(1),
        );
        assert_eq!(s.in_use, 2);
        assert_eq!(s.available.as_deref(), Some("IPv4 253, IPv6 3"));
        assert_eq!(s.allocations.len(), 3);
        assert_eq!(s.conditions[0].reason, "Valid");
        // Unchanged inputs, later: same status (no transition).
        let mut again = p.clone();
        again.status = Some(s.clone());
        assert_eq!(status(&again, v, s.allocations.clone(), at(9)), s);
        let bad = pool("bad", "addresses: [10.0.0.9-10.0.0.1]");
        let s = status(&bad, &views(&[&bad])[0], vec![], at(1));
        assert_eq!(s.conditions[0].reason, "InvalidSpec");
        assert!(
            s.conditions[0].message.contains("ends before it starts"),
            "{:?}",
            s.conditions
        );
    }
}
