//! The admin port: `/metrics`, `/healthz` (the process runs), `/readyz` (a table and an
//! instance in every site holding buckets), `/routing` (the table in use, where it came from,
//! the watch and each site's instances, as JSON).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::server::Edge;

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(edge): State<Arc<Edge>>) -> Response {
    match edge.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": {"code": "metrics", "message": e.to_string()}}),
        ),
    }
}

async fn healthz() -> Response {
    json(StatusCode::OK, serde_json::json!({"status": "alive"}))
}

async fn readyz(State(edge): State<Arc<Edge>>) -> Response {
    match edge.readiness() {
        Ok(()) => json(StatusCode::OK, serde_json::json!({"ready": true})),
        Err(why) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "reason": why}),
        ),
    }
}

async fn routing(State(edge): State<Arc<Edge>>) -> Response {
    let table = edge.routing.current();
    let body = serde_json::json!({
        "service": edge.config.service,
        "source": table.as_ref().map(|t| t.source),
        "table": table.as_deref().map(crate::routing::describe),
        "throttles_in_force": edge.throttle.limits(),
        "watch": edge.watch_status(),
        "sites": edge.upstreams.view(Instant::now()),
    });
    json(StatusCode::OK, body)
}

pub fn router(edge: Arc<Edge>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/routing", get(routing))
        .with_state(edge)
}
