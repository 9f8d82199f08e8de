//! `/metrics`, `/healthz` and `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{metrics::Metrics, state::SharedRef};

#[derive(Clone)]
struct Ctx {
    shared: SharedRef,
    metrics: Arc<Metrics>,
}

async fn metrics_handler(State(c): State<Ctx>) -> impl IntoResponse {
    let body = {
        let s = c.shared.lock().expect("agent state lock");
        c.metrics.render(&s)
    };
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
    let s = c.shared.lock().expect("agent state lock");
    match s.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Serves until the task is dropped. Binding errors are returned at once.
pub async fn serve(
    addr: SocketAddr,
    shared: SharedRef,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Ctx { shared, metrics });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await?;
    Ok(())
}
