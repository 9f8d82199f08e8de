//! Programming the node from its states, so that one state the engine cannot take never
//! holds the others back.
//!
//! Every valid state is merged (older LoadBalancer first) and applied as one [`Merged`]. If
//! the engine refuses that (ring storage full, a next hop that does not resolve...), it has
//! changed nothing it could check, and the agent falls back: it starts from what each state
//! served before (states deleted meanwhile left out, so their VIPs still go), then adds the
//! changed states one at a time, oldest LoadBalancer first, keeping each that the engine
//! takes. A state it does not take keeps serving its previous generation, if it had one, and
//! reports the engine's error in its status.

use std::collections::BTreeMap;

use anyhow::Result;

use super::{
    states::{NodeStates, StateKey, StatePart, resolve},
    status::Outcome,
};
use crate::{
    apply::ApplyReport,
    desired::{Merged, OwnerDesired, merge},
    node::Node,
};

/// What the node was last programmed with, per state.
#[derive(Debug, Default)]
pub struct Programmed {
    /// The part each state was last served with.
    pub good: BTreeMap<StateKey, StatePart>,
    /// What became of each state.
    pub outcomes: BTreeMap<StateKey, Outcome>,
}

/// The seam between the fallback and the engine, so the fallback is tested without a kernel.
pub(crate) trait Engine {
    async fn apply(&mut self, merged: &Merged) -> Result<ApplyReport>;
    fn interface(&self) -> String;
}

impl Engine for Node {
    async fn apply(&mut self, merged: &Merged) -> Result<ApplyReport> {
        Node::apply(self, merged).await
    }
    fn interface(&self) -> String {
        Node::interface(self).to_string()
    }
}

fn merged_of<E: Engine>(engine: &E, parts: &[StatePart]) -> Merged {
    let owned: Vec<OwnerDesired> = parts.iter().map(|p| p.part.clone()).collect();
    merge(&owned, Some(&engine.interface()))
}

/// `parts` with `p` in place of its key's previous part, in rank order.
fn with(parts: &[StatePart], p: &StatePart) -> Vec<StatePart> {
    let mut out: Vec<StatePart> = parts.iter().filter(|q| q.key != p.key).cloned().collect();
    out.push(p.clone());
    out.sort_by(|a, b| a.rank.cmp(&b.rank).then_with(|| a.key.cmp(&b.key)));
    out
}

/// Programs `engine` from `states`; returns what became of every state and a one-line
/// summary for the log (the engine's report, and what failed).
pub async fn program<E: Engine>(
    engine: &mut E,
    states: &NodeStates,
    node_name: &str,
    before: &Programmed,
) -> (Programmed, String) {
    let resolution = resolve(states.iter(), node_name);
    let mut outcomes: BTreeMap<StateKey, Outcome> = resolution
        .rejected
        .iter()
        .map(|(k, e)| (k.clone(), Outcome::Rejected(e.clone())))
        .collect();
    let all = resolution.parts;
    let merged = merged_of(engine, &all);
    let (served, merged, failed, summary) = match engine.apply(&merged).await {
        Ok(report) => (
            all.clone(),
            Some(merged),
            BTreeMap::new(),
            report.to_string(),
        ),
        Err(whole) => {
            let whole = format!("{whole:#}");
            let mut base: Vec<StatePart> = all
                .iter()
                .filter_map(|p| before.good.get(&p.key).cloned())
                .collect();
            let mut applied = None;
            let mut failed = BTreeMap::new();
            for p in all.iter().filter(|p| before.good.get(&p.key) != Some(p)) {
                let candidate = with(&base, p);
                let m = merged_of(engine, &candidate);
                match engine.apply(&m).await {
                    Ok(_) => {
                        base = candidate;
                        applied = Some(m);
                    }
                    Err(e) => {
                        failed.insert(p.key.clone(), format!("{e:#}"));
                    }
                }
            }
            if applied.is_none() {
                // Nothing changed was taken: put back what served (without deleted states).
                let m = merged_of(engine, &base);
                match engine.apply(&m).await {
                    Ok(_) => applied = Some(m),
                    Err(e) => {
                        // Not even that: every state reports the error, the datapath keeps
                        // what it had.
                        let e = format!("{e:#}");
                        for p in &all {
                            failed.entry(p.key.clone()).or_insert_with(|| e.clone());
                        }
                        base = before.good.values().cloned().collect();
                    }
                }
            }
            let summary = format!(
                "{} of {} node states could not be programmed ({whole})",
                failed.len(),
                all.len()
            );
            (base, applied, failed, summary)
        }
    };
    for p in &all {
        let outcome = match (failed.get(&p.key), &merged) {
            (Some(e), _) => Outcome::Failed(e.clone()),
            (None, Some(m)) => match m.owners.get(&p.part.owner) {
                Some(v) => Outcome::Merged(v.clone()),
                None => Outcome::Failed("not programmed".into()),
            },
            (None, None) => match before.outcomes.get(&p.key) {
                Some(o) => o.clone(),
                None => Outcome::Failed("not programmed".into()),
            },
        };
        outcomes.insert(p.key.clone(), outcome);
    }
    let good = served.into_iter().map(|p| (p.key.clone(), p)).collect();
    (Programmed { good, outcomes }, summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Owner, OwnerVerdict};
    use crate::kubernetes::states::tests::state;
    use kube::runtime::watcher::Event;

    /// An engine that refuses any merged state holding a VIP it was told to refuse, and
    /// remembers what it serves.
    struct Fake {
        refuse: Vec<std::net::IpAddr>,
        serving: Vec<String>,
        applies: usize,
    }

    impl Engine for Fake {
        async fn apply(&mut self, merged: &Merged) -> Result<ApplyReport> {
            self.applies += 1;
            if let Some(v) = merged
                .desired
                .vips
                .keys()
                .find(|v| self.refuse.contains(&v.addr))
            {
                anyhow::bail!("cannot program {v}");
            }
            self.serving = merged.desired.vips.keys().map(|v| v.to_string()).collect();
            Ok(ApplyReport::default())
        }
        fn interface(&self) -> String {
            "eth0".into()
        }
    }

    fn store(states: &[marklb_crds::LoadBalancerNodeState]) -> NodeStates {
        let mut s = NodeStates::default();
        s.on_event(Event::Init);
        for x in states {
            s.on_event(Event::InitApply(x.clone()));
        }
        s.on_event(Event::InitDone);
        s
    }

    fn key(n: &str) -> StateKey {
        StateKey {
            namespace: "shop".into(),
            name: n.into(),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn everything_valid_is_programmed_in_one_apply() {
        let mut e = Fake {
            refuse: vec![],
            serving: vec![],
            applies: 0,
        };
        let s = store(&[
            state("a", "a", "n", 1, "10.0.0.1"),
            state("b", "b", "n", 2, "10.0.0.1"),
            state("c", "c", "n", 3, "10.0.0.300"),
        ]);
        let (p, _) = block_on(program(&mut e, &s, "n", &Programmed::default()));
        assert_eq!(e.applies, 1);
        assert_eq!(e.serving, ["10.0.0.1:80/TCP"]);
        assert!(matches!(
            p.outcomes[&key("a")],
            Outcome::Merged(OwnerVerdict::Serving { .. })
        ));
        assert!(matches!(
            &p.outcomes[&key("b")],
            Outcome::Merged(OwnerVerdict::Conflict { winner, .. }) if *winner == Owner::new("shop", "a")
        ));
        assert!(matches!(p.outcomes[&key("c")], Outcome::Rejected(_)));
    }

    #[test]
    fn a_state_the_engine_refuses_fails_alone_and_keeps_its_previous_generation() {
        let mut e = Fake {
            refuse: vec![],
            serving: vec![],
            applies: 0,
        };
        let a = state("a", "a", "n", 1, "10.0.0.1");
        let b = state("b", "b", "n", 2, "10.0.0.2");
        let gone = state("gone", "gone", "n", 3, "10.0.0.3");
        let (first, _) = block_on(program(
            &mut e,
            &store(&[a.clone(), b.clone(), gone]),
            "n",
            &Programmed::default(),
        ));
        assert_eq!(e.serving.len(), 3);
        // b moves to a VIP the engine refuses, c is new and fine, `gone` was deleted.
        let mut b2 = b;
        b2.spec.lb.vips[0].address = "10.0.0.9".into();
        b2.metadata.generation = Some(2);
        let c = state("c", "c", "n", 4, "10.0.0.4");
        e.refuse = vec!["10.0.0.9".parse().unwrap()];
        let (second, summary) = block_on(program(&mut e, &store(&[a, b2, c]), "n", &first));
        assert_eq!(
            e.serving,
            ["10.0.0.1:80/TCP", "10.0.0.2:80/TCP", "10.0.0.4:80/TCP"],
            "b keeps its old VIP, c is added, gone's VIP is removed"
        );
        assert!(
            matches!(&second.outcomes[&key("b")], Outcome::Failed(e) if e.contains("cannot program 10.0.0.9:80/TCP"))
        );
        assert!(matches!(
            second.outcomes[&key("c")],
            Outcome::Merged(OwnerVerdict::Serving { .. })
        ));
        assert!(!second.outcomes.contains_key(&key("gone")));
        assert_eq!(second.good[&key("b")].generation, Some(1));
        assert!(
            summary.contains("1 of 3 node states could not be programmed"),
            "{summary}"
        );
    }

    /// A tiny deterministic generator (the agent has no RNG dependency).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
        fn num(&mut self, items: &[u64]) -> u64 {
            items[self.below(items.len() as u64) as usize]
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len() as u64) as usize]
        }
    }

    /// A node state as the API could hold it on 1.20 (no CEL): often wrong somewhere.
    fn hostile(rng: &mut Lcg, i: usize) -> serde_json::Value {
        let addresses = [
            "10.0.0.1",
            "10.0.0.2",
            "2001:db8::1",
            "",
            "nope",
            "999.1.1.1",
            "10.0.0.1/32",
            "fe80::1%eth0",
            "::ffff:10.0.0.1",
        ];
        let vips: Vec<serde_json::Value> = (0..rng.below(4))
            .map(|_| {
                let backends: Vec<serde_json::Value> = (0..rng.below(4))
                    .map(|_| {
                        serde_json::json!({
                            "address": rng.pick(&addresses),
                            "weight": rng.num(&[0, 1, 7, 100_000, u64::from(u32::MAX)]),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "address": rng.pick(&addresses),
                    "port": rng.num(&[0, 80, 443, 65_535]),
                    "protocol": rng.pick(&["TCP", "UDP"]),
                    "backends": backends,
                })
            })
            .collect();
        let mut lb = serde_json::json!({ "vips": vips });
        if rng.below(4) == 0 {
            lb["interface"] = serde_json::json!(rng.pick(&["eth0", "eth1", "", "a/b"]));
        }
        if rng.below(4) == 0 {
            lb["mtu"] = serde_json::json!({"size": rng.num(&[68, 1500, 9000, 100_000])});
        }
        if rng.below(4) == 0 {
            lb["hashing"] =
                serde_json::json!({"maglevTableSize": rng.num(&[4, 4099, 65_537, 65_536])});
        }
        if rng.below(4) == 0 {
            lb["flowMarks"] = serde_json::json!({"scope": rng.pick(&["PerFlow", "PerReal", "Disabled"]), "capacity": rng.num(&[0, 10, 65_535])});
        }
        serde_json::json!({
            "apiVersion": "marklb.io/v1alpha1",
            "kind": "LoadBalancerNodeState",
            "metadata": {"name": format!("s{i}"), "namespace": rng.pick(&["shop", "infra"]), "generation": 1},
            "spec": {
                "nodeName": rng.pick(&["n", "n", "n", "m", ""]),
                "loadBalancer": rng.pick(&["web", "api", "dns", ""]),
                "lb": lb,
                "loadBalancerCreated": rng.pick(&["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"]),
            },
        })
    }

    #[test]
    fn thousands_of_hostile_states_never_panic_and_each_gets_an_outcome() {
        let mut rng = Lcg(7);
        let facts = crate::kubernetes::status::tests::facts();
        let (mut parsed, mut outcomes) = (0, 0);
        for round in 0..300 {
            let states: Vec<marklb_crds::LoadBalancerNodeState> = (0..8)
                .filter_map(|i| serde_json::from_value(hostile(&mut rng, round * 8 + i)).ok())
                .collect();
            parsed += states.len();
            let s = store(&states);
            let mut e = Fake {
                refuse: vec!["10.0.0.2".parse().unwrap()],
                serving: vec![],
                applies: 0,
            };
            let (p, _) = block_on(program(&mut e, &s, "n", &Programmed::default()));
            for (k, state) in s.iter() {
                let o = p
                    .outcomes
                    .get(k)
                    .unwrap_or_else(|| panic!("{k} has no outcome"));
                outcomes += 1;
                let st = crate::kubernetes::status::status_for(
                    None,
                    state.metadata.generation,
                    state.spec.lb.flow_marks.scope,
                    o,
                    None,
                    &facts,
                    crate::kubernetes::status::now_seconds(),
                );
                assert_eq!(st.observed_generation, Some(1));
                let ready =
                    marklb_crds::conditions::find_condition(&st.conditions, "Ready").unwrap();
                assert_eq!(
                    ready.status == "True",
                    matches!(o, Outcome::Merged(v) if v.is_serving()),
                    "{k}: {o:?}"
                );
            }
        }
        assert!(parsed > 1_000, "only {parsed} of 2,400 parsed");
        assert_eq!(outcomes, parsed);
    }
}
