//! The plan without a datapath: what is written, kept, removed and retired.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use marklb_crds::loadbalancer::MarkScope;

use super::*;
use crate::desired::{MarkPolicy, NextHop, NodeSettings, Owner, VipPlan};

/// What is programmed, as plain data: VIP -> (backends, table size, adopted).
#[derive(Clone, Debug, Default)]
struct Now {
    vips: BTreeMap<VipId, (Vec<Backend>, u32, bool)>,
    /// Reals holding a slot without any VIP (adopted, unclaimed).
    extra_reals: Vec<IpAddr>,
    ring_capacity: u32,
}

impl Programmed for Now {
    fn vip_ids(&self) -> Vec<VipId> {
        self.vips.keys().copied().collect()
    }

    fn vip(&self, vip: &VipId) -> Option<ProgrammedVip<'_>> {
        self.vips.get(vip).map(|(b, t, a)| ProgrammedVip {
            backends: b,
            table_size: *t,
            adopted: *a,
        })
    }

    fn real_addrs(&self) -> Vec<IpAddr> {
        let mut r: Vec<IpAddr> = self
            .vips
            .values()
            .flat_map(|(b, _, _)| b.iter().map(|b| b.addr))
            .chain(self.extra_reals.iter().copied())
            .collect();
        r.sort();
        r.dedup();
        r
    }

    fn has_real(&self, addr: &IpAddr) -> bool {
        self.real_addrs().contains(addr)
    }

    fn real_refs(&self, addr: &IpAddr) -> u32 {
        let listing = self
            .vips
            .values()
            .filter(|(b, _, _)| b.iter().any(|b| b.addr == *addr));
        listing.count() as u32
    }

    fn ring_capacity(&self) -> u32 {
        self.ring_capacity
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn vip(s: &str) -> VipId {
    VipId::tcp(ip(s), 80)
}

fn backends(reals: &[&str]) -> Vec<Backend> {
    reals
        .iter()
        .map(|r| Backend {
            addr: ip(r),
            weight: 1,
        })
        .collect()
}

fn desired(vips: &[(&str, &[&str])]) -> Desired {
    Desired {
        settings: NodeSettings {
            interface: None,
            next_hop: NextHop::default(),
            marks: MarkPolicy {
                scope: MarkScope::PerFlow,
                capacity: 100,
                idle_timeout: Duration::from_secs(30),
            },
            mtu: 1500,
            icmp_too_big: true,
            icmp_echo: true,
            encap_src_v4_be: 0,
            encap_src_v6_be: [0; 4],
            udp_packets_before_mark: marklb_common::DEFAULT_UDP_EVENT_PACKETS,
        },
        vips: vips
            .iter()
            .map(|(v, r)| {
                let plan = VipPlan {
                    label: v.to_string(),
                    backends: backends(r),
                    table_size: 7,
                    owner: Owner::new("", "t"),
                };
                (vip(v), plan)
            })
            .collect(),
    }
}

/// `desired` programmed as is.
fn programmed(d: &Desired) -> Now {
    Now {
        vips: d
            .vips
            .iter()
            .map(|(k, v)| (*k, (v.backends.clone(), v.table_size, false)))
            .collect(),
        extra_reals: Vec::new(),
        ring_capacity: 1_000,
    }
}

#[test]
fn from_nothing_everything_is_added() {
    let d = desired(&[("10.0.0.1", &["10.1.0.1"]), ("10.0.0.2", &["10.1.0.2"])]);
    let p = plan(&Now::default(), &d);
    assert_eq!(p.added, vec![vip("10.0.0.1"), vip("10.0.0.2")]);
    assert_eq!(p.writes(), p.added);
    assert!(p.removed.is_empty() && p.changed.is_empty() && p.reals_retired.is_empty());
    assert!(!p.is_noop());
}

#[test]
fn the_same_state_again_is_a_noop() {
    let d = desired(&[("10.0.0.1", &["10.1.0.1", "10.1.0.2"])]);
    let p = plan(&programmed(&d), &d);
    assert!(p.is_noop(), "{p:?}");
    assert_eq!(p.unchanged, 1);
}

#[test]
fn weight_and_table_size_changes_rewrite_the_vip() {
    let d = desired(&[("10.0.0.1", &["10.1.0.1", "10.1.0.2"])]);
    let now = programmed(&d);
    let mut w = d.clone();
    w.vips.get_mut(&vip("10.0.0.1")).unwrap().backends[1].weight = 0;
    let p = plan(&now, &w);
    assert_eq!(p.changed, vec![vip("10.0.0.1")]);
    assert!(p.pairs_leaving.is_empty(), "a drained real stays listed");
    assert!(p.reals_retired.is_empty(), "a drained real keeps its slot");
    let mut t = d.clone();
    t.vips.get_mut(&vip("10.0.0.1")).unwrap().table_size = 11;
    assert_eq!(plan(&now, &t).changed, vec![vip("10.0.0.1")]);
}

#[test]
fn a_real_leaving_one_vip_but_kept_by_another_moves_only_that_vips_flows() {
    let before = desired(&[
        ("10.0.0.1", &["10.1.0.1", "10.1.0.2"]),
        ("10.0.0.2", &["10.1.0.1", "10.1.0.3"]),
    ]);
    let after = desired(&[
        ("10.0.0.1", &["10.1.0.2"]),
        ("10.0.0.2", &["10.1.0.1", "10.1.0.3"]),
    ]);
    let p = plan(&programmed(&before), &after);
    assert_eq!(p.changed, vec![vip("10.0.0.1")]);
    assert_eq!(p.unchanged, 1);
    assert_eq!(p.pairs_leaving, vec![(vip("10.0.0.1"), ip("10.1.0.1"))]);
    assert!(p.reals_retired.is_empty());
    assert_eq!(
        p.reals_staying,
        [ip("10.1.0.1"), ip("10.1.0.2")],
        "the rewritten VIP's reals that stay are held; untouched ones need not be"
    );
}

#[test]
fn a_real_nothing_lists_is_retired_not_moved() {
    let before = desired(&[("10.0.0.1", &["10.1.0.1", "10.1.0.2"])]);
    let after = desired(&[("10.0.0.1", &["10.1.0.2"])]);
    let p = plan(&programmed(&before), &after);
    assert_eq!(p.reals_retired, vec![ip("10.1.0.1")]);
    assert!(
        p.pairs_leaving.is_empty(),
        "retiring invalidates all of its marks"
    );
}

#[test]
fn removed_vips_go_and_their_reals_are_retired_unless_another_vip_takes_them() {
    let before = desired(&[("10.0.0.1", &["10.1.0.1"]), ("10.0.0.2", &["10.1.0.2"])]);
    // 10.0.0.2 goes; its real moves to a new VIP in the same apply and keeps its slot.
    let after = desired(&[("10.0.0.1", &["10.1.0.1"]), ("10.0.0.3", &["10.1.0.2"])]);
    let p = plan(&programmed(&before), &after);
    assert_eq!(p.removed, vec![vip("10.0.0.2")]);
    assert_eq!(p.added, vec![vip("10.0.0.3")]);
    assert!(p.reals_retired.is_empty(), "{p:?}");
    assert!(
        p.reals_staying.contains(&ip("10.1.0.2")),
        "it keeps its slot"
    );
    let p = plan(
        &programmed(&before),
        &desired(&[("10.0.0.1", &["10.1.0.1"])]),
    );
    assert_eq!(p.reals_retired, vec![ip("10.1.0.2")]);
}

#[test]
fn adopted_vips_are_claimed_and_unclaimed_adopted_reals_retired() {
    let d = desired(&[("10.0.0.1", &["10.1.0.1"]), ("10.0.0.2", &["10.1.0.2"])]);
    let mut now = Now {
        ring_capacity: 1_000,
        ..Now::default()
    };
    // A restarted agent: VIPs with unknown backends, reals without references.
    for v in d.vips.keys() {
        now.vips.insert(*v, (Vec::new(), 7, true));
    }
    now.extra_reals = vec![ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.9")];
    let p = plan(&now, &d);
    assert_eq!(p.adopted, vec![vip("10.0.0.1"), vip("10.0.0.2")]);
    assert!(p.added.is_empty() && p.changed.is_empty());
    assert_eq!(p.reals_retired, vec![ip("10.1.0.9")]);
}

#[test]
fn capacity_is_checked_on_the_whole_state() {
    let d = desired(&[("10.0.0.1", &["10.1.0.1"]), ("10.0.0.2", &["10.1.0.2"])]);
    let mut now = Now {
        ring_capacity: 21,
        ..Now::default()
    };
    // Two rings of 7 plus one being replaced.
    assert_eq!(check_capacity(&now, &d), Ok(()));
    now.ring_capacity = 20;
    let e = check_capacity(&now, &d).unwrap_err();
    assert!(e.contains("need 21 slots") && e.contains("has 20"), "{e}");
}
