//! The thin layer that writes what the pure modules decided.
//!
//! Every object is written by server-side apply with field manager `marklb-operator` (forced:
//! the operator is the only writer of these fields). A write is skipped when the watch cache
//! already holds what would be written ([`contains`]: every field we set has that value; the
//! server's defaults and other managers' fields are ignored), which is what keeps the number of
//! requests per LoadBalancer change proportional to the nodes that change, not to all nodes.
//! Deleting what is already gone (404) is success. After writing, a reconcile waits (briefly)
//! until the cache shows its writes ([`await_cached`]), so the reconcile queued behind it does
//! not compare against the objects as they were and write them again.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use marklb_crds::labels::{OPERATOR_FIELD_MANAGER, OPERATOR_STATUS_FIELD_MANAGER};
use marklb_crds::{API_VERSION, LoadBalancer, LoadBalancerNodeState, LoadBalancerStatus};
use serde::Serialize;
use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::{Error, Result};

/// Whether `have` holds every field of `want` with the same value: objects and maps field by
/// field, lists of equal length element by element. Fields only in `have` are ignored.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (_, Value::Null) => true,
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| contains(h.get(k).unwrap_or(&Value::Null), wv)),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| contains(hv, wv))
        }
        (h, w) => h == w,
    }
}

fn to_value<T: Serialize>(what: &'static str, obj: &T) -> Result<Value> {
    serde_json::to_value(obj).map_err(|source| Error::Serialize { what, source })
}

/// Whether `existing` (from the cache) lacks something of `desired`: a different spec, a
/// missing or different label, a missing owner reference. Compared field by field (no JSON):
/// this runs for every node state of a LoadBalancer on every reconcile.
pub fn node_state_needs_write(
    desired: &LoadBalancerNodeState,
    existing: Option<&LoadBalancerNodeState>,
) -> Result<bool> {
    let Some(existing) = existing else {
        return Ok(true);
    };
    // The spec must be equal, not just contain ours: a field we stopped setting must go.
    if existing.spec != desired.spec {
        return Ok(true);
    }
    let labels_held = desired
        .labels()
        .iter()
        .all(|(k, v)| existing.labels().get(k) == Some(v));
    let owners_held = desired.owner_references().iter().all(|want| {
        existing.owner_references().iter().any(|have| {
            have.uid == want.uid
                && have.kind == want.kind
                && have.name == want.name
                && have.controller == want.controller
        })
    });
    Ok(!(labels_held && owners_held))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(OPERATOR_FIELD_MANAGER).force()
}

/// Status applies go under their own manager (see [`OPERATOR_STATUS_FIELD_MANAGER`]).
pub(crate) fn status_apply_params() -> PatchParams {
    PatchParams::apply(OPERATOR_STATUS_FIELD_MANAGER).force()
}

/// Server-side applies a node state; returns the object as stored.
pub async fn apply_node_state(
    client: &Client,
    metrics: &Metrics,
    state: &LoadBalancerNodeState,
) -> Result<LoadBalancerNodeState> {
    let ns = state.namespace().unwrap_or_default();
    let api: Api<LoadBalancerNodeState> = Api::namespaced(client.clone(), &ns);
    let mut body = state.clone();
    body.status = None;
    body.metadata.managed_fields = None;
    body.metadata.resource_version = None;
    metrics.wrote("LoadBalancerNodeState", "apply");
    Ok(api
        .patch(&state.name_any(), &apply_params(), &Patch::Apply(&body))
        .await?)
}

/// Deletes a node state (already gone is fine).
pub async fn delete_node_state(
    client: &Client,
    metrics: &Metrics,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let api: Api<LoadBalancerNodeState> = Api::namespaced(client.clone(), namespace);
    metrics.wrote("LoadBalancerNodeState", "delete");
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// How often [`await_cached`] looks at the cache.
const CACHE_POLL: Duration = Duration::from_millis(5);

/// Waits at most `limit` until `cache` holds every node state of `applied` as written (nothing
/// left to write, by [`node_state_needs_write`]) and none of `deleted` (names in `namespace`);
/// returns whether it did.
///
/// Why: agents write their node state's status while the operator is still applying the
/// others, which queues the next reconcile of the LoadBalancer; it starts as soon as this one
/// returns, and the watch may not have delivered the last applies yet. Without the wait it saw
/// a node state without its new spec and applied it a second time (1,001 applies for 1,000
/// nodes). Giving up after `limit` costs at most such an idempotent write, never correctness.
pub async fn await_cached(
    cache: &Store<LoadBalancerNodeState>,
    namespace: &str,
    applied: &[LoadBalancerNodeState],
    deleted: &[String],
    limit: Duration,
) -> bool {
    let key = |name: &str| ObjectRef::new(name).within(namespace);
    let caught_up = || {
        applied.iter().all(|want| {
            let have = cache.get(&key(&want.name_any()));
            matches!(node_state_needs_write(want, have.as_deref()), Ok(false))
        }) && deleted.iter().all(|name| cache.get(&key(name)).is_none())
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if caught_up() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(CACHE_POLL).await;
    }
}

/// Server-side applies the agent DaemonSet.
pub async fn apply_daemonset(
    client: &Client,
    metrics: &Metrics,
    ds: &DaemonSet,
) -> Result<DaemonSet> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &ds.namespace().unwrap_or_default());
    metrics.wrote("DaemonSet", "apply");
    Ok(api
        .patch(&ds.name_any(), &apply_params(), &Patch::Apply(ds))
        .await?)
}

/// Whether the stored DaemonSet lacks something of the desired one.
pub fn daemonset_needs_write(desired: &DaemonSet, existing: Option<&DaemonSet>) -> Result<bool> {
    let Some(existing) = existing else {
        return Ok(true);
    };
    let (mut want, have) = (
        to_value("DaemonSet", desired)?,
        to_value("DaemonSet", existing)?,
    );
    if let Some(meta) = want.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, _| k == "labels" || k == "ownerReferences");
    }
    // Affinity lists must be equal, not contained: a removed selector must go.
    let path = ["spec", "template", "spec", "affinity"];
    let pick = |v: &Value| {
        path.iter()
            .fold(v.clone(), |v, k| v.get(*k).cloned().unwrap_or(Value::Null))
    };
    Ok(pick(&want) != pick(&have) || !contains(&have, &want))
}

/// Writes the status of a LoadBalancer (server-side apply on the status subresource).
pub async fn patch_status(
    client: &Client,
    metrics: &Metrics,
    lb: &LoadBalancer,
    status: &LoadBalancerStatus,
) -> Result<()> {
    let api: Api<LoadBalancer> =
        Api::namespaced(client.clone(), &lb.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": API_VERSION,
        "kind": "LoadBalancer",
        "status": to_value("LoadBalancer status", status)?,
    });
    metrics.wrote("LoadBalancer", "status");
    api.patch_status(&lb.name_any(), &status_apply_params(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Sets the finalizers of a LoadBalancer (merge patch guarded by its resourceVersion, so a
/// concurrent change fails with 409 and is retried rather than lost).
pub async fn set_finalizers(
    client: &Client,
    metrics: &Metrics,
    lb: &LoadBalancer,
    finalizers: Vec<String>,
) -> Result<()> {
    let api: Api<LoadBalancer> =
        Api::namespaced(client.clone(), &lb.namespace().unwrap_or_default());
    let body = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": lb.resource_version(),
        }
    });
    metrics.wrote("LoadBalancer", "finalizer");
    match api
        .patch(
            &lb.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Gone already: nothing holds it any more.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::lb;

    #[test]
    fn contains_ignores_server_fields_but_not_changed_values() {
        let have = json!({"a": 1, "b": {"c": [{"x": 1, "default": true}], "d": "s"}, "server": 9});
        assert!(contains(&have, &json!({"a": 1, "b": {"c": [{"x": 1}]}})));
        assert!(!contains(&have, &json!({"a": 2})));
        assert!(!contains(&have, &json!({"b": {"c": [{"x": 1}, {"x": 2}]}})));
        assert!(!contains(&have, &json!({"new": 1})));
        assert!(contains(&have, &json!({"b": {"d": "s"}})));
    }

    #[test]
    fn a_cached_state_equal_to_the_desired_one_is_not_written() {
        let web = lb("prod", "web", 1, "vips: [{address: 10.0.0.1}]");
        let want = crate::desired::node_state(&web, "a", &web.spec);
        let mut stored = want.clone();
        stored.metadata.resource_version = Some("7".into());
        stored.metadata.generation = Some(3);
        stored
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("extra".into(), "x".into());
        assert!(!node_state_needs_write(&want, Some(&stored)).unwrap());
        assert!(node_state_needs_write(&want, None).unwrap());
        let mut changed = stored.clone();
        changed.spec.lb.vips[0].port = 8;
        assert!(node_state_needs_write(&want, Some(&changed)).unwrap());
        let mut relabelled = stored.clone();
        relabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(marklb_crds::labels::NODE_LABEL);
        assert!(node_state_needs_write(&want, Some(&relabelled)).unwrap());
    }

    #[tokio::test]
    async fn await_cached_returns_once_the_watch_delivers_the_writes() {
        use kube::runtime::watcher::Event;
        let web = lb("prod", "web", 1, "vips: [{address: 10.0.0.1}]");
        let old = crate::desired::node_state(&web, "a", &web.spec);
        let gone = crate::desired::node_state(&web, "b", &web.spec);
        let mut want = old.clone();
        want.spec.lb.vips[0].port = 8;
        let (cache, mut writer) = crate::fixtures::store_with_writer(vec![old, gone.clone()]);
        let deleted = [gone.name_any()];
        let long = Duration::from_secs(30);

        // Nothing delivered: the wait gives up at its limit.
        let started = std::time::Instant::now();
        let limit = Duration::from_millis(50);
        assert!(!await_cached(&cache, "prod", std::slice::from_ref(&want), &deleted, limit).await);
        assert!(started.elapsed() >= limit);

        // The apply and the delete arrive a moment later: the wait ends then, not at its limit.
        let (stored, deletion) = (want.clone(), gone.clone());
        let deliver = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.apply_watcher_event(&Event::Apply(stored));
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.apply_watcher_event(&Event::Delete(deletion));
            writer
        });
        let started = std::time::Instant::now();
        assert!(await_cached(&cache, "prod", std::slice::from_ref(&want), &deleted, long).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        let _writer = deliver.await.unwrap();
        // Already caught up: no wait at all.
        assert!(await_cached(&cache, "prod", &[want], &deleted, Duration::ZERO).await);
    }

    #[test]
    fn daemonset_writes_when_affinity_or_args_change_only() {
        use std::collections::BTreeMap;
        let settings = crate::AgentSettings::default();
        let zone = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        let want = crate::desired::agent_daemonset("ns", &settings, [Some(&zone)]);
        let mut stored = want.clone();
        stored.metadata.uid = Some("u".into());
        stored.spec.as_mut().unwrap().revision_history_limit = Some(10);
        assert!(!daemonset_needs_write(&want, Some(&stored)).unwrap());
        let wider = crate::desired::agent_daemonset("ns", &settings, [Some(&zone), None]);
        assert!(daemonset_needs_write(&wider, Some(&stored)).unwrap());
        let other_image = crate::desired::agent_daemonset(
            "ns",
            &crate::AgentSettings {
                image: "x:2".into(),
                ..settings
            },
            [Some(&zone)],
        );
        assert!(daemonset_needs_write(&other_image, Some(&stored)).unwrap());
    }
}
