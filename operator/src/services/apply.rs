//! The writes of the Service controller.
//!
//! - LoadBalancers and the decapsulator DaemonSet: server-side apply, field manager
//!   `marklb-operator`, skipped when the cache already holds them.
//! - A Service's status: server-side apply on the status subresource (the operator owns
//!   `status.loadBalancer` and its own condition types, nothing else); finalizers by merge
//!   patch guarded by the `resourceVersion` (a concurrent change fails with 409, retried).
//! - A pool's status (the ledger): JSON merge patch carrying the `resourceVersion` read
//!   (optimistic concurrency): if anybody wrote the pool since, the API server answers 409
//!   and nothing is written ([`LedgerWrite::Stale`]).

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use marklb_crds::labels::OPERATOR_FIELD_MANAGER;
use marklb_crds::{LoadBalancer, LoadBalancerIPPool, LoadBalancerIPPoolStatus};
use serde_json::{Value, json};

use crate::apply::contains;
use crate::metrics::Metrics;
use crate::{Error, Result};

fn apply_params() -> PatchParams {
    PatchParams::apply(OPERATOR_FIELD_MANAGER).force()
}

fn to_value<T: serde::Serialize>(what: &'static str, obj: &T) -> Result<Value> {
    serde_json::to_value(obj).map_err(|source| Error::Serialize { what, source })
}

/// Whether the cached LoadBalancer lacks something of the desired one (spec equal, our
/// labels and owner references present).
pub fn lb_needs_write(desired: &LoadBalancer, existing: Option<&LoadBalancer>) -> Result<bool> {
    let Some(existing) = existing else {
        return Ok(true);
    };
    if existing.spec != desired.spec {
        return Ok(true);
    }
    let fields = |lb: &LoadBalancer| -> Result<Value> {
        Ok(json!({"metadata": {
            "labels": lb.metadata.labels,
            "ownerReferences": to_value("owner references", &lb.metadata.owner_references)?,
        }}))
    };
    Ok(!contains(&fields(existing)?, &fields(desired)?))
}

/// Server-side applies a LoadBalancer.
pub async fn apply_lb(
    client: &Client,
    metrics: &Metrics,
    lb: &LoadBalancer,
) -> Result<LoadBalancer> {
    let api: Api<LoadBalancer> =
        Api::namespaced(client.clone(), &lb.namespace().unwrap_or_default());
    let mut body = lb.clone();
    body.status = None;
    metrics.wrote("LoadBalancer", "apply");
    Ok(api
        .patch(&lb.name_any(), &apply_params(), &Patch::Apply(&body))
        .await?)
}

/// Deletes a LoadBalancer (already gone is fine).
pub async fn delete_lb(
    client: &Client,
    metrics: &Metrics,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let api: Api<LoadBalancer> = Api::namespaced(client.clone(), namespace);
    metrics.wrote("LoadBalancer", "delete");
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the part of a Service's status marklb owns: `ingress` and marklb's conditions.
/// Empty lists release what marklb set before (server-side apply drops the fields a manager
/// stops applying).
pub async fn apply_service_status(
    client: &Client,
    metrics: &Metrics,
    svc: &Service,
    ingress: &[LoadBalancerIngress],
    conditions: &[Condition],
) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), &svc.namespace().unwrap_or_default());
    let mut status = json!({});
    if !ingress.is_empty() {
        status["loadBalancer"] = json!({"ingress": to_value("ingress", &ingress)?});
    }
    if !conditions.is_empty() {
        status["conditions"] = to_value("conditions", &conditions)?;
    }
    let body = json!({"apiVersion": "v1", "kind": "Service", "status": status});
    metrics.wrote("Service", "status");
    // Under the spec's manager: the operator applies no Service spec, so nothing of it can be
    // lost (see OPERATOR_STATUS_FIELD_MANAGER), and a Service's ingress written by an earlier
    // version stays releasable.
    api.patch_status(&svc.name_any(), &apply_params(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Sets the finalizers of a Service (merge patch guarded by its `resourceVersion`).
pub async fn set_service_finalizers(
    client: &Client,
    metrics: &Metrics,
    svc: &Service,
    finalizers: Vec<String>,
) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), &svc.namespace().unwrap_or_default());
    let body =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": svc.resource_version()}});
    metrics.wrote("Service", "finalizer");
    match api
        .patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A pool as stored now (the ledger is written against this, never against the cache).
pub async fn get_pool(client: &Client, name: &str) -> Result<Option<LoadBalancerIPPool>> {
    let api: Api<LoadBalancerIPPool> = Api::all(client.clone());
    Ok(api.get_opt(name).await?)
}

/// A Service as stored now (to confirm that a ledger entry's Service is gone).
pub async fn get_service(client: &Client, namespace: &str, name: &str) -> Result<Option<Service>> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    Ok(api.get_opt(name).await?)
}

/// Outcome of a ledger write.
#[derive(Debug, PartialEq, Eq)]
pub enum LedgerWrite {
    Written,
    /// The pool changed since it was read (409), or is gone: read again and decide again.
    Stale,
}

/// Writes `status` of pool `name` if it is still at `resource_version`.
pub async fn write_pool_status(
    client: &Client,
    metrics: &Metrics,
    name: &str,
    resource_version: &str,
    status: &LoadBalancerIPPoolStatus,
) -> Result<LedgerWrite> {
    let api: Api<LoadBalancerIPPool> = Api::all(client.clone());
    let body = json!({
        "metadata": {"resourceVersion": resource_version},
        "status": to_value("pool status", status)?,
    });
    metrics.wrote("LoadBalancerIPPool", "status");
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(LedgerWrite::Written),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(LedgerWrite::Stale),
        Err(e) => Err(e.into()),
    }
}

/// Server-side applies the decapsulator DaemonSet.
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
