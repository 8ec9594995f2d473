//! The operations endpoint: `/healthz` (alive, and the pipeline not stuck), `/readyz`
//! (consuming and Redis answers), `/metrics` (Prometheus text format), `/shards/top` (the
//! heaviest tenants of each shard, JSON).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::telemetry;

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/shards/top", get(shards_top))
        .with_state(health)
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.stalled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "stuck: messages in flight and none settled for http.stall_seconds\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let r = health.readiness();
    let status = if r.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!(
            "consuming: {}\nredis: {}\nredis_checks_failing: {}\n{}",
            r.consuming,
            r.redis_probe,
            r.checks_failing,
            health.errors()
        ),
    )
}

/// The heaviest tenants of each shard of a sharded inbound, as this gate saw them in the
/// last one to two minutes (see [`crate::top`]).
async fn shards_top(State(health): State<Arc<Health>>) -> impl IntoResponse {
    axum::Json(health.top.top())
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, health: Arc<Health>, shutdown: CancellationToken) {
    let result = axum::serve(listener, router(health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "http server failed");
    }
}
