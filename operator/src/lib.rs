//! marklb-operator: reconciles `LoadBalancer`s into one `LoadBalancerNodeState` per selected
//! node, one agent DaemonSet scheduled on the selected nodes, and LoadBalancer conditions
//! rolled up from what the agents report.
//!
//! Layers point one way (as in kube-rs `controller-rs`):
//! - pure functions decide: [`desired`] (node states of a LoadBalancer, the agent DaemonSet),
//!   [`endpoints`] (EndpointSlices to backends), [`conflicts`] (older LoadBalancer wins on a
//!   shared node), [`rollup`] (node-state statuses to LoadBalancer status);
//! - [`apply`] writes what they decided (server-side apply, field manager `marklb-operator`,
//!   writes skipped when the cache already holds the object; stale node states deleted);
//! - [`controller`] wires watches, caches, the finalizer and the deletion protocol;
//! - [`metrics`], [`http`], [`leader`] and [`manifests`] serve the process around it;
//! - [`services`] serves Services of type LoadBalancer (address pools, an owned LoadBalancer
//!   per Service with the nodes as reals, the decapsulator DaemonSet) next to it.
//!
//! Everything the operator applies uses only fields Kubernetes 1.20 knows (server-side apply
//! there fails with 500 on any other).

pub mod apply;
pub mod conflicts;
pub mod controller;
pub mod desired;
pub mod endpoints;
pub mod http;
pub mod install_owner;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod rollup;
pub mod services;
pub mod settings;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod hostile;

pub use controller::{Context, run};
pub use settings::{AgentSettings, MetricsBind, ServiceSettings, Settings};

/// Why a reconciliation failed. Each kind has a metric label
/// (`marklb_operator_reconcile_errors_total{error=...}`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed (network, conflict, refused).
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// The finalizer helper failed to add or remove the finalizer, or the reconcile inside it
    /// failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// An object the operator builds did not serialize (a bug).
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The name of a node state is held by another LoadBalancer's state (`<lb>-<node>` is
    /// ambiguous in rare cases); the operator never takes it over.
    #[error("{0}")]
    NameTaken(String),
    /// A LoadBalancer without a namespace (LoadBalancers are namespaced: a bug or a bad cache).
    #[error("LoadBalancer {0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// The metric label of this kind of error (low cardinality: never the message).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(status)) if status.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(status)) if status.code == 422 => "invalid",
            Error::Kube(kube::Error::Api(status)) if status.code >= 500 => "server_error",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "transport",
            Error::Finalizer(inner) => match &**inner {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Serialize { .. } => "serialize",
            Error::NoNamespace(_) => "no_namespace",
            Error::NameTaken(_) => "name_taken",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

/// Result of the operator's fallible steps.
pub type Result<T, E = Error> = std::result::Result<T, E>;
