//! This node's LoadBalancerNodeStates as the watch delivers them, and what they ask the node
//! to program (pure: no I/O).
//!
//! - [`NodeStates`] is the agent's copy of the API: built from watch events (a re-list
//!   replaces it whole, so a state deleted while the API server was away is noticed), and
//!   also fed the objects returned by status writes (the newest `resourceVersion` wins).
//! - [`resolve`] turns every state into an owner's part for the engine's merge, ranked as
//!   the operator ranks them (older LoadBalancer first), or rejects it with a reason that goes
//!   into that state's status only: one bad state never stops the others.
//! - [`Specs`] is what the datapath was last programmed from, to tell a change of a spec
//!   (program again) from a change of a status (the agent's own writes coming back).

use std::collections::BTreeMap;

use kube::{ResourceExt, runtime::watcher::Event};
use marklb_crds::{LoadBalancerNodeState, LoadBalancerNodeStateSpec, node_state::OwnerRank};

use crate::desired::{Owner, OwnerDesired};

/// A node state's identity: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateKey {
    pub namespace: String,
    pub name: String,
}

impl StateKey {
    pub fn of(state: &LoadBalancerNodeState) -> Self {
        Self {
            namespace: state.namespace().unwrap_or_default(),
            name: state.name_any(),
        }
    }
}

impl std::fmt::Display for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Whether `new` is at least as recent as `old` by `resourceVersion`. Versions are opaque to
/// clients in principle; every API server in use numbers them from etcd's revision, so they
/// compare as integers; anything else counts as newer (the later arrival wins).
fn not_older(new: &LoadBalancerNodeState, old: &LoadBalancerNodeState) -> bool {
    let version = |s: &LoadBalancerNodeState| {
        s.metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (version(new), version(old)) {
        (Some(n), Some(o)) => n >= o,
        _ => true,
    }
}

/// The node states the watch has shown, by key.
#[derive(Debug, Default)]
pub struct NodeStates {
    objects: BTreeMap<StateKey, LoadBalancerNodeState>,
    /// Objects of a (re-)list in progress; swapped in whole when it completes.
    listing: Option<BTreeMap<StateKey, LoadBalancerNodeState>>,
    /// A complete list has been seen: until then the agent must not program anything (an
    /// empty store would remove every VIP the pinned datapath still serves).
    synced: bool,
}

impl NodeStates {
    /// Feeds one watch event; returns whether the stored objects changed in a way worth
    /// looking at (an object applied or deleted, a list completed).
    pub fn on_event(&mut self, event: Event<LoadBalancerNodeState>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                self.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(StateKey::of(&obj), obj);
                false
            }
            Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply(obj) => {
                self.observe(obj);
                true
            }
            Event::Delete(obj) => self.objects.remove(&StateKey::of(&obj)).is_some(),
        }
    }

    /// Takes the object a status write returned, if the watch still holds it and has nothing
    /// newer: the response can arrive before or after the watch event of the same write, and
    /// after the watch's Delete of the object too, which must not bring it back (an agent once
    /// kept serving a deleted node state until the next re-list). Only the watch adds objects.
    pub fn observe_written(&mut self, obj: LoadBalancerNodeState) {
        if self.objects.contains_key(&StateKey::of(&obj)) {
            self.observe(obj);
        }
    }

    /// Stores `obj` unless a newer version of it is stored already.
    fn observe(&mut self, obj: LoadBalancerNodeState) {
        let key = StateKey::of(&obj);
        match self.objects.get(&key) {
            Some(old) if !not_older(&obj, old) => {}
            _ => {
                self.objects.insert(key, obj);
            }
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &StateKey) -> Option<&LoadBalancerNodeState> {
        self.objects.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&StateKey, &LoadBalancerNodeState)> {
        self.objects.iter()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// The specs, to compare with what was programmed.
    pub fn specs(&self) -> Specs {
        Specs(
            self.objects
                .iter()
                .map(|(k, s)| (k.clone(), (s.metadata.generation, s.spec.clone())))
                .collect(),
        )
    }
}

/// Every state's generation and spec: when these are unchanged, nothing needs programming
/// (the agent's own status writes come back through the watch and must not re-program).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Specs(BTreeMap<StateKey, (Option<i64>, LoadBalancerNodeStateSpec)>);

/// One state that can be merged: its owner's part, and where it ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct StatePart {
    pub key: StateKey,
    pub generation: Option<i64>,
    pub rank: OwnerRank,
    pub part: OwnerDesired,
}

/// What the states ask for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// States that can be merged, in rank order (oldest LoadBalancer first).
    pub parts: Vec<StatePart>,
    /// States that cannot be served at all, and why (goes into their status).
    pub rejected: BTreeMap<StateKey, String>,
}

/// The owner of a state's VIPs: its LoadBalancer (the state's namespace, `spec.loadBalancer`).
pub fn owner_of(state: &LoadBalancerNodeState) -> Owner {
    Owner::new(
        state.namespace().unwrap_or_default(),
        state.spec.load_balancer.clone(),
    )
}

/// Resolves every state for the agent of `node_name`.
///
/// A state is rejected when its spec fails the node-state validation (the API server of
/// Kubernetes 1.20 has no CEL rules, so the agent checks the same rules in Rust), when it names
/// another node, or when another state carries the same LoadBalancer already (the better
/// ranked one, which the operator would write, is kept).
pub fn resolve<'a>(
    states: impl IntoIterator<Item = (&'a StateKey, &'a LoadBalancerNodeState)>,
    node_name: &str,
) -> Resolution {
    let mut out = Resolution::default();
    let mut ranked: Vec<StatePart> = Vec::new();
    for (key, state) in states {
        match part_of(state, node_name) {
            Ok(part) => ranked.push(StatePart {
                key: key.clone(),
                generation: state.metadata.generation,
                rank: state.owner_rank(),
                part,
            }),
            Err(e) => {
                out.rejected.insert(key.clone(), e);
            }
        }
    }
    ranked.sort_by(|a, b| a.rank.cmp(&b.rank).then_with(|| a.key.cmp(&b.key)));
    for p in ranked {
        if let Some(first) = out.parts.iter().find(|q| q.part.owner == p.part.owner) {
            out.rejected.insert(
                p.key.clone(),
                format!(
                    "node state {} already carries LoadBalancer {} for this node",
                    first.key, p.part.owner
                ),
            );
            continue;
        }
        out.parts.push(p);
    }
    out
}

fn part_of(state: &LoadBalancerNodeState, node_name: &str) -> Result<OwnerDesired, String> {
    let spec = &state.spec;
    spec.validate()
        .map_err(|e| e.to_string().replace('\n', "; "))?;
    if spec.node_name != node_name {
        return Err(format!(
            "spec.nodeName is {} but this agent serves node {node_name}",
            spec.node_name
        ));
    }
    let mut lb = spec.lb.clone();
    // The operator resolves the LoadBalancer's interface into the node state's own field.
    if spec.interface.is_some() {
        lb.interface = spec.interface.clone();
    }
    OwnerDesired::from_spec(owner_of(state), &lb)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
    use marklb_crds::{
        LoadBalancerNodeStateStatus, LoadBalancerSpec,
        loadbalancer::{Backend, Vip},
    };

    pub(crate) fn state(
        name: &str,
        lb: &str,
        node: &str,
        created: i64,
        vip: &str,
    ) -> LoadBalancerNodeState {
        let mut s = LoadBalancerNodeState::new(
            name,
            LoadBalancerNodeStateSpec {
                node_name: node.into(),
                load_balancer: lb.into(),
                interface: None,
                lb: LoadBalancerSpec {
                    vips: vec![Vip {
                        name: None,
                        address: vip.into(),
                        port: 80,
                        protocol: Default::default(),
                        backends: vec![Backend {
                            address: "10.1.0.1".into(),
                            weight: 1,
                        }],
                        backend_service: None,
                    }],
                    ..LoadBalancerSpec::default()
                },
                load_balancer_created: Some(Time(Timestamp::from_second(created).unwrap())),
            },
        );
        s.metadata.namespace = Some("shop".into());
        s.metadata.generation = Some(1);
        s.metadata.resource_version = Some("10".into());
        s
    }

    fn listed(states: &[LoadBalancerNodeState]) -> NodeStates {
        let mut store = NodeStates::default();
        store.on_event(Event::Init);
        for s in states {
            store.on_event(Event::InitApply(s.clone()));
        }
        store.on_event(Event::InitDone);
        store
    }

    fn names(r: &Resolution) -> Vec<String> {
        r.parts.iter().map(|p| p.key.name.clone()).collect()
    }

    #[test]
    fn nothing_is_synced_before_a_complete_list_and_a_relist_replaces_everything() {
        let mut store = NodeStates::default();
        assert!(!store.on_event(Event::Init));
        assert!(!store.on_event(Event::InitApply(state("a", "a", "n", 1, "10.0.0.1"))));
        assert!(!store.synced(), "half a list must never be programmed");
        assert!(store.on_event(Event::InitDone));
        assert_eq!(store.len(), 1);
        // The API server came back without `a` (deleted meanwhile) and with `b`.
        store.on_event(Event::Init);
        assert_eq!(
            store.len(),
            1,
            "the old objects serve until the list completes"
        );
        store.on_event(Event::InitApply(state("b", "b", "n", 1, "10.0.0.2")));
        store.on_event(Event::InitDone);
        let keys: Vec<_> = store.iter().map(|(k, _)| k.name.clone()).collect();
        assert_eq!(keys, ["b"]);
        assert!(store.on_event(Event::Delete(state("b", "b", "n", 1, "10.0.0.2"))));
        assert!(!store.on_event(Event::Delete(state("b", "b", "n", 1, "10.0.0.2"))));
    }

    #[test]
    fn a_write_response_after_the_delete_does_not_bring_the_object_back() {
        let mut store = listed(&[state("a", "a", "n", 1, "10.0.0.1")]);
        let mut written = state("a", "a", "n", 1, "10.0.0.1");
        written.metadata.resource_version = Some("30".into());
        assert!(store.on_event(Event::Delete(state("a", "a", "n", 1, "10.0.0.1"))));
        store.observe_written(written);
        assert_eq!(
            store.len(),
            0,
            "resurrected by a late status-write response"
        );
        // Nor does a response add an object the watch never showed.
        store.observe_written(state("b", "b", "n", 1, "10.0.0.2"));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let mut store = listed(&[]);
        let mut newer = state("a", "a", "n", 1, "10.0.0.1");
        newer.metadata.resource_version = Some("20".into());
        newer.status = Some(LoadBalancerNodeStateStatus {
            vips: 1,
            ..Default::default()
        });
        store.on_event(Event::Apply(state("a", "a", "n", 1, "10.0.0.1")));
        store.observe_written(newer);
        // The watch event of an earlier write arrives after the newer write's response.
        store.on_event(Event::Apply(state("a", "a", "n", 1, "10.0.0.1")));
        let key = StateKey {
            namespace: "shop".into(),
            name: "a".into(),
        };
        assert_eq!(
            store
                .get(&key)
                .and_then(|s| s.status.as_ref())
                .map(|s| s.vips),
            Some(1)
        );
    }

    #[test]
    fn status_changes_leave_the_specs_equal() {
        let a = state("a", "a", "n", 1, "10.0.0.1");
        let store = listed(std::slice::from_ref(&a));
        let before = store.specs();
        let mut with_status = a.clone();
        with_status.metadata.resource_version = Some("11".into());
        with_status.status = Some(LoadBalancerNodeStateStatus {
            vips: 1,
            ..Default::default()
        });
        let mut store = store;
        store.on_event(Event::Apply(with_status));
        assert_eq!(store.specs(), before);
        let mut edited = a;
        edited.metadata.resource_version = Some("12".into());
        edited.metadata.generation = Some(2);
        edited.spec.lb.vips[0].port = 81;
        store.on_event(Event::Apply(edited));
        assert_ne!(store.specs(), before);
    }

    #[test]
    fn parts_are_ranked_older_loadbalancer_first() {
        let store = listed(&[
            state("young", "young", "n", 300, "10.0.0.1"),
            state("old", "old", "n", 100, "10.0.0.2"),
            state("mid", "mid", "n", 200, "10.0.0.3"),
        ]);
        let r = resolve(store.iter(), "n");
        assert_eq!(names(&r), ["old", "mid", "young"]);
        assert!(r.rejected.is_empty());
        assert_eq!(r.parts[0].part.owner, Owner::new("shop", "old"));
    }

    #[test]
    fn bad_states_are_rejected_alone_with_the_reason() {
        let mut invalid = state("bad", "bad", "n", 1, "10.0.0.300");
        invalid.metadata.generation = Some(4);
        let elsewhere = state("other", "other", "m", 1, "10.0.0.4");
        let twin = state("web-again", "web", "n", 2, "10.0.0.5");
        let store = listed(&[
            state("web", "web", "n", 1, "10.0.0.1"),
            invalid,
            elsewhere,
            twin,
        ]);
        let r = resolve(store.iter(), "n");
        assert_eq!(names(&r), ["web"]);
        let why = |n: &str| {
            r.rejected
                .iter()
                .find(|(k, _)| k.name == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert!(
            why("bad").contains("spec.lb.vips[0].address"),
            "{}",
            why("bad")
        );
        assert!(
            why("other").contains("spec.nodeName is m but this agent serves node n"),
            "{}",
            why("other")
        );
        assert!(
            why("web-again").contains("node state shop/web already carries LoadBalancer shop/web"),
            "{}",
            why("web-again")
        );
    }

    #[test]
    fn the_node_states_interface_is_the_one_asked_for() {
        let mut s = state("a", "a", "n", 1, "10.0.0.1");
        s.spec.interface = Some("eth7".into());
        let store = listed(&[s]);
        let r = resolve(store.iter(), "n");
        assert_eq!(r.parts[0].part.settings.interface.as_deref(), Some("eth7"));
    }
}
