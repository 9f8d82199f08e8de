//! The owner of what the operator applies at run time (the agent and decapsulator DaemonSets):
//! the operator's own ServiceAccount, so that removing the install (`helm uninstall`,
//! `kubectl delete -k`) lets Kubernetes' garbage collector delete those DaemonSets too.
//!
//! Why the ServiceAccount and not the operator's Deployment: both belong to the install and
//! live in the operator's namespace, but the Deployment is the object users and tools replace
//! (a changed `spec.selector` is immutable, so changing it means delete and re-create; a
//! `kubectl delete deployment --cascade=foreground` to "restart" it), and every such
//! replacement would take the agents of every node with it. The ServiceAccount is the
//! operator's identity: its RBAC bindings name it, the operator cannot act without it, and
//! nothing replaces it short of removing the install. The operator learns its name from the
//! downward API (`spec.serviceAccountName`), so it needs nothing but `get` on that one object.
//!
//! The reference has no `blockOwnerDeletion` (that would need `update` on the
//! ServiceAccount's finalizers, a permission we do not want) and no `controller` (the
//! ServiceAccount does not manage the DaemonSet).
//!
//! A failed lookup never stops the operator: the DaemonSet is applied without the reference
//! (agents matter more than a clean uninstall), the failure is logged and counted
//! (`marklb_operator_reconcile_errors_total{error="install_owner"}`), and the next apply asks
//! again; once the lookup succeeds the DaemonSet is applied again with the reference.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// The metric label of a failed lookup.
pub const LOOKUP_ERROR: &str = "install_owner";

/// The ServiceAccount `name` in `namespace`, looked up once (again after a failure).
pub struct InstallOwner {
    namespace: String,
    /// `None`: no owner configured (the operator runs outside the install, e.g. in tests).
    name: Option<String>,
    found: tokio::sync::Mutex<Option<OwnerReference>>,
}

impl InstallOwner {
    pub fn new(namespace: &str, name: Option<&str>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.filter(|n| !n.is_empty()).map(str::to_string),
            found: tokio::sync::Mutex::default(),
        }
    }

    /// Makes `ds` owned by the ServiceAccount, or by nothing when none is configured or the
    /// lookup failed ([`reference`](Self::reference)).
    pub async fn own(&self, ds: &mut DaemonSet, client: &Client, metrics: &Metrics) {
        ds.metadata.owner_references = self.reference(client, metrics).await.map(|o| vec![o]);
    }

    /// The owner reference to put on what the operator applies, `None` when none is
    /// configured or the lookup failed (logged and counted; asked again next time).
    pub async fn reference(&self, client: &Client, metrics: &Metrics) -> Option<OwnerReference> {
        let name = self.name.as_deref()?;
        let mut found = self.found.lock().await;
        if found.is_none() {
            let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &self.namespace);
            match api.get(name).await {
                Ok(sa) => {
                    let owner = owner_reference(&sa);
                    info!(namespace = %self.namespace, serviceaccount = name, uid = %owner.uid,
                        "owner of the DaemonSets the operator applies");
                    *found = Some(owner);
                }
                Err(e) => {
                    metrics.errors.with_label_values(&[LOOKUP_ERROR]).inc();
                    warn!(namespace = %self.namespace, serviceaccount = name, error = %e,
                        "cannot look up the operator's ServiceAccount: the DaemonSets are applied \
                         without an owner (an uninstall would leave them) until a later attempt \
                         succeeds");
                }
            }
        }
        found.clone()
    }
}

/// A plain (non-controller, non-blocking) owner reference to `sa`.
pub fn owner_reference(sa: &ServiceAccount) -> OwnerReference {
    OwnerReference {
        api_version: ServiceAccount::api_version(&()).into_owned(),
        kind: ServiceAccount::kind(&()).into_owned(),
        name: sa.name_any(),
        uid: sa.uid().unwrap_or_default(),
        controller: None,
        block_owner_deletion: None,
    }
}
