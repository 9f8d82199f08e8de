//! `/metrics`, `/healthz`, `/readyz` and `/status`.
//!
//! None of them takes the node engine's lock for longer than counting marks per VIP
//! (`/status` only): `/metrics` reads what the engine publishes and the statistics maps
//! through its own handle, `/readyz` asks the kernel what is attached.

use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{
    metrics::Metrics,
    netlink::Netlink,
    node::{self, NodeHandle},
};

#[derive(Clone)]
struct Ctx {
    node: NodeHandle,
    metrics: Arc<Metrics>,
    netlink: Arc<Netlink>,
}

async fn metrics_handler(State(c): State<Ctx>) -> impl IntoResponse {
    let published = c.node.published();
    let body = c
        .metrics
        .render(&published.view(), &published.marks(), published.stats());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(c): State<Ctx>) -> (StatusCode, String) {
    let view = c.node.published().view();
    match node::readiness(&view, &c.netlink).await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn status(State(c): State<Ctx>) -> Json<node::NodeReport> {
    Json(c.node.report())
}

/// Serves until the task is dropped. Binding errors are returned at once.
pub async fn serve(
    addr: SocketAddr,
    node: NodeHandle,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let netlink = Arc::new(Netlink::connect()?);
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(Ctx {
            node,
            metrics,
            netlink,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz, /status");
    axum::serve(listener, app).await?;
    Ok(())
}
