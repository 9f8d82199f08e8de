//! `/metrics`, `/healthz` and `/readyz` of the operator.
//!
//! `/healthz` answers 200 while the process serves HTTP. `/readyz` answers 200 once this
//! replica can do its job: the leader once its caches are filled, a standby replica as soon as
//! it waits for the Lease (it is ready to take over; only the leader writes). The body says
//! which. `/metrics` computes the condition gauges from the caches at scrape time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::controller::Caches;
use crate::metrics::Metrics;

/// What the HTTP endpoints read, shared with the controller and the leader election.
#[derive(Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// The controller's caches, once it runs (only on the leader).
    pub caches: OnceLock<Caches>,
    /// Set by the controller once its caches are filled.
    pub ready: AtomicBool,
    /// Set while this replica waits for the Lease.
    pub standby: AtomicBool,
}

/// The router of the three endpoints.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (lbs, states) = match shared.caches.get() {
        Some(c) => (c.loadbalancers.state(), c.node_states.state()),
        None => (Vec::new(), Vec::new()),
    };
    let body = shared
        .metrics
        .render(lbs.iter().map(|l| &**l), states.iter().map(|s| &**s));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready: leader, caches filled\n")
    } else if shared.standby.load(Ordering::SeqCst) {
        (
            StatusCode::OK,
            "ready: standby, waiting for the leader Lease\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: caches filling\n",
        )
    }
}

/// Serves the endpoints on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(shared)).await
}
