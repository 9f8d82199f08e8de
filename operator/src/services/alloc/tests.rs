//! Allocation: worked examples, then property tests over seeded random histories of
//! Services created, changed and deleted against three pools; after every step the operator's
//! reconciles are replayed until nothing changes, and the ledger must satisfy the rules of
//! the module (checked by an independent brute-force oracle).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::services::fixtures::service;
use crate::services::request::{self, FamilyPolicy};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pool(name: &str, yaml: &str) -> PoolView {
    PoolView::new(name, serde_yaml::from_str(yaml).unwrap())
}

fn req(ns: &str, name: &str, yaml: &str) -> Request {
    request::read(&service(ns, name, yaml)).unwrap()
}

/// Runs `r` and records the outcome in `ledgers` (per pool), as the controller does.
fn reconcile(
    r: &Request,
    pools: &[PoolView],
    ledgers: &mut BTreeMap<String, Vec<PoolAllocation>>,
    ns_labels: &BTreeMap<String, String>,
) -> Result<Allocation, Refusal> {
    let ledger = Ledger::from_pools(ledgers.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let result = allocate(r, pools, &ledger, ns_labels);
    for p in pools {
        let current = ledgers.entry(p.name.clone()).or_default();
        *current = record(
            current,
            &p.name,
            &r.id,
            result.as_ref().ok().map(|a| (r, a)),
        );
    }
    result
}

const TCP80: &str = "spec: {type: LoadBalancer, ports: [{port: 80}]}";

#[test]
fn lowest_free_address_first_and_released_on_deletion() {
    let pools = [pool("a", "addresses: [10.0.0.0/30]")];
    let mut ledgers = BTreeMap::new();
    let none = BTreeMap::new();
    let one = req("x", "one", TCP80);
    let two = req("x", "two", TCP80);
    assert_eq!(
        reconcile(&one, &pools, &mut ledgers, &none)
            .unwrap()
            .addresses,
        [ip("10.0.0.0")]
    );
    assert_eq!(
        reconcile(&two, &pools, &mut ledgers, &none)
            .unwrap()
            .addresses,
        [ip("10.0.0.1")]
    );
    // Re-running changes nothing (a restarted operator).
    let before = ledgers.clone();
    assert_eq!(
        reconcile(&one, &pools, &mut ledgers, &none)
            .unwrap()
            .addresses,
        [ip("10.0.0.0")]
    );
    assert_eq!(ledgers, before);
    // Deleting one frees its address for the next Service.
    ledgers.insert("a".into(), record(&ledgers["a"], "a", &one.id, None));
    let three = req("x", "three", TCP80);
    assert_eq!(
        reconcile(&three, &pools, &mut ledgers, &none)
            .unwrap()
            .addresses,
        [ip("10.0.0.0")]
    );
}

#[test]
fn a_full_pool_is_refused_with_a_reason() {
    let pools = [pool(
        "a",
        "addresses: [10.0.0.255-10.0.1.0, 10.0.1.1]\navoidBuggyIPs: true",
    )];
    let mut ledgers = BTreeMap::new();
    let none = BTreeMap::new();
    assert_eq!(
        reconcile(&req("x", "one", TCP80), &pools, &mut ledgers, &none)
            .unwrap()
            .addresses,
        [ip("10.0.1.1")]
    );
    let refused = reconcile(&req("x", "two", TCP80), &pools, &mut ledgers, &none).unwrap_err();
    assert_eq!(refused.reason, reason::POOL_EXHAUSTED);
    assert_eq!(refused.message, "pool a has no free IPv4 address");
}

#[test]
fn requested_addresses_are_honoured_or_refused_with_the_holder() {
    let pools = [
        pool("a", "addresses: [10.0.0.0/24]\navoidBuggyIPs: true"),
        pool(
            "b",
            "addresses: [10.0.1.0/24]\nautoAssign: false\nserviceAllocation: {namespaces: [x]}",
        ),
    ];
    let mut ledgers = BTreeMap::new();
    let none = BTreeMap::new();
    let ask = |name: &str, ns: &str, address: &str| {
        req(
            ns,
            name,
            &format!(
                "spec: {{type: LoadBalancer, loadBalancerIP: {address}, ports: [{{port: 80}}]}}"
            ),
        )
    };
    // From a pool without autoAssign: a requested address is enough.
    assert_eq!(
        reconcile(&ask("one", "x", "10.0.1.7"), &pools, &mut ledgers, &none).unwrap(),
        Allocation {
            pool: "b".into(),
            addresses: vec![ip("10.0.1.7")]
        }
    );
    let cases = [
        (
            ask("two", "x", "10.0.1.7"),
            reason::ADDRESS_IN_USE,
            "10.0.1.7 is held by x/one",
        ),
        (
            ask("two", "y", "10.0.1.8"),
            reason::POOL_NOT_ALLOWED,
            "pool b does not admit Services of namespace y",
        ),
        (
            ask("two", "x", "10.9.0.1"),
            reason::ADDRESS_NOT_IN_POOL,
            "10.9.0.1: in no valid pool",
        ),
        (
            ask("two", "x", "10.0.0.255"),
            reason::ADDRESS_NOT_IN_POOL,
            "avoids addresses ending in .0 and .255",
        ),
    ];
    for (r, reason, text) in cases {
        let refused = reconcile(&r, &pools, &mut ledgers, &none).unwrap_err();
        assert_eq!(refused.reason, reason, "{refused:?}");
        assert!(refused.message.contains(text), "{refused:?}");
    }
    // Named pools: missing, invalid, not admitting.
    let named = |pool: &str| {
        req(
            "y",
            "n",
            &format!("metadata: {{annotations: {{marklb.io/address-pool: {pool}}}}}\n{TCP80}"),
        )
    };
    let bad = [pool("bad", "addresses: [10.0.2.9-10.0.2.1]")];
    assert_eq!(
        reconcile(&named("zzz"), &pools, &mut ledgers, &none)
            .unwrap_err()
            .reason,
        reason::POOL_NOT_FOUND
    );
    assert_eq!(
        reconcile(&named("b"), &pools, &mut ledgers, &none)
            .unwrap_err()
            .reason,
        reason::POOL_NOT_ALLOWED
    );
    assert_eq!(
        reconcile(&named("bad"), &bad, &mut ledgers, &none)
            .unwrap_err()
            .reason,
        reason::POOL_INVALID
    );
    // No auto-assigning pool admits namespace y's Service with a label selector pool only.
    let only_b = [pools[1].clone()];
    let refused = reconcile(&req("y", "z", TCP80), &only_b, &mut ledgers, &none).unwrap_err();
    assert_eq!(refused.reason, reason::NO_POOL);
}

#[test]
fn sharing_needs_one_key_and_distinct_ports() {
    let pools = [pool("a", "addresses: [10.0.0.1-10.0.0.2]")];
    let mut ledgers = BTreeMap::new();
    let none = BTreeMap::new();
    let shared = |name: &str, key: &str, port: u16| {
        req(
            "x",
            name,
            &format!(
                "metadata: {{annotations: {{marklb.io/allow-shared-ip: {key}}}}}\nspec: {{type: LoadBalancer, ports: [{{port: {port}}}]}}"
            ),
        )
    };
    let web = reconcile(&shared("web", "k", 80), &pools, &mut ledgers, &none).unwrap();
    let dns = reconcile(&shared("dns", "k", 53), &pools, &mut ledgers, &none).unwrap();
    assert_eq!(web.addresses, dns.addresses, "same key, other port: shared");
    let clash = reconcile(&shared("web2", "k", 80), &pools, &mut ledgers, &none).unwrap();
    assert_ne!(clash.addresses, web.addresses, "same port: another address");
    let other_key = reconcile(&shared("other", "j", 22), &pools, &mut ledgers, &none);
    assert_eq!(other_key.unwrap_err().reason, reason::POOL_EXHAUSTED);
    // Asking for the shared address with another key names the holder and the key.
    let ask = req(
        "x",
        "ask",
        "metadata: {annotations: {marklb.io/allow-shared-ip: j}}\nspec: {type: LoadBalancer, loadBalancerIP: 10.0.0.1, ports: [{port: 22}]}",
    );
    let refused = reconcile(&ask, &pools, &mut ledgers, &none).unwrap_err();
    assert_eq!(
        refused.message,
        "10.0.0.1 is held by x/web with sharing key \"k\", not \"j\""
    );
}

#[test]
fn dual_stack_policies_take_one_address_per_family_from_one_pool() {
    let pools = [
        pool("a", "addresses: [10.0.0.1]"),
        pool("b", "addresses: [10.0.1.1, 'fd00::1']"),
    ];
    let none = BTreeMap::new();
    let mut ledgers = BTreeMap::new();
    let require = req(
        "x",
        "r",
        "spec: {type: LoadBalancer, ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6, IPv4], ports: [{port: 80}]}",
    );
    // Pool a has no IPv6: b serves both, in the Service's family order.
    assert_eq!(
        reconcile(&require, &pools, &mut ledgers, &none).unwrap(),
        Allocation {
            pool: "b".into(),
            addresses: vec![ip("fd00::1"), ip("10.0.1.1")]
        }
    );
    let prefer = req(
        "x",
        "p",
        "spec: {type: LoadBalancer, ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv4, IPv6], ports: [{port: 80}]}",
    );
    assert_eq!(
        reconcile(&prefer, &pools, &mut ledgers, &none)
            .unwrap()
            .addresses,
        [ip("10.0.0.1")]
    );
    let require2 = req(
        "x",
        "r2",
        "spec: {type: LoadBalancer, ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv4, IPv6], ports: [{port: 80}]}",
    );
    let refused = reconcile(&require2, &pools, &mut ledgers, &none).unwrap_err();
    assert_eq!(refused.reason, reason::POOL_EXHAUSTED);
    assert_eq!(require.policy, FamilyPolicy::RequireDualStack);
}

#[test]
fn an_invalid_pool_keeps_what_it_handed_out_and_hands_out_nothing_new() {
    let good = [pool("a", "addresses: [10.0.0.0/30]")];
    let mut ledgers = BTreeMap::new();
    let none = BTreeMap::new();
    let one = req("x", "one", TCP80);
    let got = reconcile(&one, &good, &mut ledgers, &none).unwrap();
    // A bad edit: the range is reversed now.
    let broken = [pool("a", "addresses: [10.0.0.3-10.0.0.0]")];
    assert_eq!(reconcile(&one, &broken, &mut ledgers, &none).unwrap(), got);
    let two = reconcile(&req("x", "two", TCP80), &broken, &mut ledgers, &none).unwrap_err();
    assert_eq!(two.reason, reason::NO_POOL);
}

#[test]
fn of_two_holders_whose_ports_start_to_clash_the_later_one_moves() {
    let pools = [pool("a", "addresses: [10.0.0.1-10.0.0.2]")];
    let mut ledgers = BTreeMap::new();
    let none = BTreeMap::new();
    let svc = |name: &str, port: u16| {
        req(
            "x",
            name,
            &format!(
                "metadata: {{annotations: {{marklb.io/allow-shared-ip: k}}}}\nspec: {{type: LoadBalancer, ports: [{{port: {port}}}]}}"
            ),
        )
    };
    let first = reconcile(&svc("first", 80), &pools, &mut ledgers, &none).unwrap();
    let second = reconcile(&svc("second", 53), &pools, &mut ledgers, &none).unwrap();
    assert_eq!(first, second);
    // The earlier holder changes its port to the other's: it keeps the address, the later
    // holder moves when it is reconciled.
    assert_eq!(
        reconcile(&svc("first", 53), &pools, &mut ledgers, &none).unwrap(),
        first
    );
    let moved = reconcile(&svc("second", 53), &pools, &mut ledgers, &none).unwrap();
    assert_eq!(moved.addresses, [ip("10.0.0.2")]);
}

// ---- property tests ----

/// The oracle's view of sharing: every holder of an address carries one key and no two
/// share a port.
fn compatible(holders: &[&PoolAllocation]) -> bool {
    let key = &holders[0].sharing_key;
    if holders.len() > 1 && key.is_none() {
        return false;
    }
    let mut ports = BTreeSet::new();
    holders
        .iter()
        .all(|h| &h.sharing_key == key && h.ports.iter().all(|p| ports.insert(p.clone())))
}

struct World {
    pools: Vec<PoolView>,
    ledgers: BTreeMap<String, Vec<PoolAllocation>>,
    services: BTreeMap<String, Request>,
    outcomes: BTreeMap<String, Result<Allocation, Refusal>>,
    ns_labels: BTreeMap<String, String>,
}

impl World {
    fn settle(&mut self) -> usize {
        for round in 1..=20 {
            let before = self.ledgers.clone();
            let services: Vec<Request> = self.services.values().cloned().collect();
            for r in &services {
                let out = reconcile(r, &self.pools, &mut self.ledgers, &self.ns_labels);
                self.outcomes.insert(r.id.uid.clone(), out);
            }
            if self.ledgers == before {
                return round;
            }
        }
        panic!(
            "reconciles did not settle in 20 rounds: {:#?}",
            self.ledgers
        );
    }

    fn check(&self, seed: u64, step: usize) {
        let ctx = format!("seed {seed} step {step}");
        // Every address: compatible holders; every entry: a live Service.
        let mut by_address: BTreeMap<&str, Vec<&PoolAllocation>> = BTreeMap::new();
        for (pool_name, entries) in &self.ledgers {
            let pool = self.pools.iter().find(|p| &p.name == pool_name).unwrap();
            for e in entries {
                by_address.entry(&e.address).or_default().push(e);
                let r = self
                    .services
                    .get(&e.uid)
                    .unwrap_or_else(|| panic!("{ctx}: {e:?} of a deleted Service"));
                let a = ip(&e.address);
                assert!(pool.offers(a), "{ctx}: {a} is not offered by {pool_name}");
                assert!(
                    r.wanted().contains(&Family::of(a)),
                    "{ctx}: {a} of an unwanted family for {e:?}"
                );
            }
        }
        for (address, holders) in &by_address {
            assert!(compatible(holders), "{ctx}: {address} held by {holders:#?}");
        }
        for (uid, r) in &self.services {
            let held: Vec<(&String, &PoolAllocation)> = self
                .ledgers
                .iter()
                .flat_map(|(p, es)| es.iter().map(move |e| (p, e)))
                .filter(|(_, e)| &e.uid == uid)
                .collect();
            let pools: BTreeSet<&String> = held.iter().map(|(p, _)| *p).collect();
            assert!(pools.len() <= 1, "{ctx}: {uid} holds in {pools:?}");
            let families: Vec<Family> = held
                .iter()
                .map(|(_, e)| Family::of(ip(&e.address)))
                .collect();
            let distinct: BTreeSet<&Family> = families.iter().collect();
            assert_eq!(
                distinct.len(),
                families.len(),
                "{ctx}: {uid} holds two of a family"
            );
            match &self.outcomes[uid] {
                Ok(a) => {
                    let mut got: Vec<IpAddr> = held.iter().map(|(_, e)| ip(&e.address)).collect();
                    let mut want = a.addresses.clone();
                    got.sort();
                    want.sort();
                    assert_eq!(
                        got, want,
                        "{ctx}: {uid}'s ledger entries are its allocation"
                    );
                    for f in r.required() {
                        assert!(families.contains(&f), "{ctx}: {uid} lacks required {f}");
                    }
                    for requested in &r.requested {
                        assert!(
                            a.addresses.contains(requested),
                            "{ctx}: {uid} asked {requested}, got {a:?}"
                        );
                    }
                }
                Err(refusal) => {
                    assert!(held.is_empty(), "{ctx}: refused {uid} still holds {held:?}");
                    assert!(!refusal.message.is_empty());
                    self.check_refusal(r, refusal, &by_address, &ctx);
                }
            }
        }
    }

    /// A refusal must be true: exhaustion means no usable address; "in use" means a holder
    /// the Service cannot share with.
    fn check_refusal(
        &self,
        r: &Request,
        refusal: &Refusal,
        by_address: &BTreeMap<&str, Vec<&PoolAllocation>>,
        ctx: &str,
    ) {
        let usable_for = |a: IpAddr| match by_address.get(a.to_string().as_str()) {
            None => true,
            Some(holders) => {
                r.sharing_key.is_some()
                    && holders.iter().all(|h| {
                        h.sharing_key == r.sharing_key
                            && h.ports.iter().all(|p| !r.port_labels().contains(p))
                    })
            }
        };
        match refusal.reason {
            reason::POOL_EXHAUSTED => {
                assert!(
                    r.requested.is_empty(),
                    "{ctx}: exhaustion for a requested address"
                );
                for pool in self.pools.iter().filter(|p| {
                    p.spec.auto_assign && p.spec.admits(&r.id.namespace, &self.ns_labels, &r.labels)
                }) {
                    let needed: Vec<Family> = if r.required().is_empty() {
                        r.wanted().to_vec()
                    } else {
                        r.required()
                    };
                    let all_families_free = needed.iter().all(|f| {
                        pool.blocks().iter().filter(|b| b.family() == *f).any(|b| {
                            let (lo, hi) = (addresses_u(b.first), addresses_u(b.last));
                            (lo..=hi).any(|n| {
                                let a = marklb_crds::pool::addresses::from_u128(*f, n);
                                pool.offers(a) && usable_for(a)
                            })
                        })
                    });
                    let prefer_any = r.required().is_empty()
                        && r.wanted().iter().any(|f| {
                            pool.blocks().iter().filter(|b| b.family() == *f).any(|b| {
                                (addresses_u(b.first)..=addresses_u(b.last)).any(|n| {
                                    let a = marklb_crds::pool::addresses::from_u128(*f, n);
                                    pool.offers(a) && usable_for(a)
                                })
                            })
                        });
                    assert!(
                        !all_families_free && !prefer_any,
                        "{ctx}: {} refused as exhausted but pool {} has room: {refusal:?}",
                        r.id.key(),
                        pool.name
                    );
                }
            }
            reason::ADDRESS_IN_USE => {
                let a = r
                    .requested
                    .iter()
                    .find(|a| refusal.message.starts_with(&a.to_string()))
                    .unwrap();
                assert!(
                    !usable_for(*a),
                    "{ctx}: {a} refused as in use but usable: {refusal:?}"
                );
            }
            reason::ADDRESS_NOT_IN_POOL | reason::POOL_NOT_ALLOWED => {
                assert!(
                    !r.requested.is_empty(),
                    "{ctx}: {refusal:?} without a request"
                );
                // Honoured whenever possible: some requested address is outside every pool
                // that admits the Service and offers it.
                let admitted_offering = |a: &IpAddr| {
                    self.pools.iter().any(|p| {
                        p.offers(*a) && p.spec.admits(&r.id.namespace, &self.ns_labels, &r.labels)
                    })
                };
                assert!(
                    !r.requested.iter().all(admitted_offering),
                    "{ctx}: {refusal:?}"
                );
            }
            reason::NO_POOL => {
                assert!(
                    !self.pools.iter().any(|p| p.spec.auto_assign
                        && p.spec.admits(&r.id.namespace, &self.ns_labels, &r.labels)),
                    "{ctx}"
                );
            }
            other => panic!("{ctx}: unexpected reason {other}: {refusal:?}"),
        }
    }
}

fn addresses_u(a: IpAddr) -> u128 {
    marklb_crds::pool::addresses::to_u128(a)
}

fn random_service(rng: &mut StdRng, n: usize) -> Request {
    let ns = if rng.random_bool(0.7) { "x" } else { "y" };
    let (policy, families) = match rng.random_range(0..4) {
        0 => ("SingleStack", "[IPv6]"),
        1 => ("PreferDualStack", "[IPv4, IPv6]"),
        2 => ("RequireDualStack", "[IPv6, IPv4]"),
        _ => ("SingleStack", "[IPv4]"),
    };
    let ports: Vec<String> = ["{port: 80}", "{port: 443}", "{port: 53, protocol: UDP}"]
        .iter()
        .filter(|_| rng.random_bool(0.5))
        .map(|p| p.to_string())
        .collect();
    let ports = if ports.is_empty() {
        vec!["{port: 8080}".to_string()]
    } else {
        ports
    };
    let mut annotations = Vec::new();
    if rng.random_bool(0.5) {
        annotations.push(format!(
            "marklb.io/allow-shared-ip: k{}",
            rng.random_range(0..2)
        ));
    }
    let mut lb_ip = String::new();
    if rng.random_bool(0.25) && policy != "RequireDualStack" {
        let first_family_v6 = families.starts_with("[IPv6");
        let a = if first_family_v6 {
            format!("'fd00::{:x}'", rng.random_range(0..10))
        } else {
            format!(
                "10.0.{}.{}",
                rng.random_range(0..3),
                rng.random_range(250..=255)
            )
        };
        lb_ip = format!(", loadBalancerIP: {a}");
    }
    let yaml = format!(
        "metadata: {{annotations: {{{}}}}}\nspec: {{type: LoadBalancer, ipFamilyPolicy: {policy}, ipFamilies: {families}{lb_ip}, ports: [{}]}}",
        annotations.join(", "),
        ports.join(", ")
    );
    let name = format!("s{n}");
    request::read(&service(ns, &name, &yaml)).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

#[test]
fn random_histories_keep_every_rule() {
    let seeds: Vec<u64> = match std::env::var("MARKLB_ALLOC_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..40).collect(),
    };
    let mut settled_rounds = Vec::new();
    let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut world = World {
            pools: vec![
                pool(
                    "a",
                    "addresses: [10.0.0.250-10.0.1.3, 'fd00::0-fd00::3']\navoidBuggyIPs: true",
                ),
                pool(
                    "b",
                    "addresses: [10.0.1.254/31, 'fd00::8/126']\nserviceAllocation: {namespaces: [x]}",
                ),
                pool("c", "addresses: [10.0.2.250-10.0.2.255]\nautoAssign: false"),
            ],
            ledgers: BTreeMap::new(),
            services: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            ns_labels: BTreeMap::new(),
        };
        let mut n = 0;
        for step in 0..60 {
            let roll = rng.random_range(0..10);
            if roll < 5 || world.services.is_empty() {
                n += 1;
                let r = random_service(&mut rng, n);
                world.services.insert(r.id.uid.clone(), r);
            } else if roll < 8 {
                // Delete: the finalizer releases the Service's entries.
                let uid = world
                    .services
                    .keys()
                    .nth(rng.random_range(0..world.services.len()))
                    .unwrap()
                    .clone();
                let r = world.services.remove(&uid).unwrap();
                world.outcomes.remove(&uid);
                for (p, entries) in world.ledgers.iter_mut() {
                    *entries = record(entries, p, &r.id, None);
                }
                assert!(
                    world.ledgers.values().flatten().all(|e| e.uid != uid),
                    "seed {seed}: not released"
                );
            } else {
                // Change: a Service's ports and sharing key are edited (same uid).
                let uid = world
                    .services
                    .keys()
                    .nth(rng.random_range(0..world.services.len()))
                    .unwrap()
                    .clone();
                let old = world.services[&uid].clone();
                let mut new = random_service(&mut rng, 0);
                new.id = old.id.clone();
                new.families = old.families.clone();
                new.policy = old.policy;
                new.requested = old.requested.clone();
                world.services.insert(uid, new);
            }
            settled_rounds.push(world.settle());
            world.check(seed, step);
            for outcome in world.outcomes.values() {
                let key = match outcome {
                    Ok(a) if a.addresses.len() == 2 => "dual",
                    Ok(_) => "allocated",
                    Err(r) => r.reason,
                };
                *tally.entry(key).or_insert(0usize) += 1;
            }
            for entries in world.ledgers.values() {
                let addresses: Vec<&String> = entries.iter().map(|e| &e.address).collect();
                let distinct: BTreeSet<&&String> = addresses.iter().collect();
                *tally.entry("shared").or_insert(0) += addresses.len() - distinct.len();
            }
            // A restarted operator re-derives the same allocations and writes nothing.
            let before = world.ledgers.clone();
            world.settle();
            assert_eq!(
                world.ledgers, before,
                "seed {seed} step {step}: a second pass changed the ledger"
            );
        }
    }
    // The histories must have exercised every rule, or the checks above prove nothing.
    eprintln!("outcomes over all steps: {tally:?}");
    assert!(
        tally.get("allocated").copied().unwrap_or(0) > 500,
        "{tally:?}"
    );
    assert!(tally.get("shared").copied().unwrap_or(0) > 20, "{tally:?}");
    assert!(tally.get("dual").copied().unwrap_or(0) > 20, "{tally:?}");
    for reason in [
        reason::POOL_EXHAUSTED,
        reason::ADDRESS_IN_USE,
        reason::ADDRESS_NOT_IN_POOL,
    ] {
        assert!(
            tally.get(reason).copied().unwrap_or(0) > 5,
            "{reason}: {tally:?}"
        );
    }
    let worst = settled_rounds.iter().max().unwrap();
    assert!(*worst <= 3, "settling took {worst} rounds");
}
