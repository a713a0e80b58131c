//! `/metrics` (Prometheus text) and `/healthz` for the operator process.
//!
//! Metrics: `dynamo_operator_reconciles_total`, `dynamo_operator_reconcile_failures_total{error}`
//! (labels from [`crate::controller::Error::metric_label`]), `dynamo_operator_reconcile_duration_seconds`,
//! `dynamo_operator_gangs_placed_total`, `dynamo_operator_gangs_unplaceable` (gangs waiting for room
//! right now), `dynamo_operator_leader` (1 while this process leads), and the SLA planner's
//! `dynamo_operator_planner_decisions_total{graph,path,acted}`, `..._planner_replicas{graph,service}`,
//! `..._planner_observed_requests_per_second` and `..._planner_predicted_requests_per_second`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlannerLabels {
    pub graph: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub graph: String,
    pub path: &'static str,
    pub acted: &'static str,
}

/// The operator's metrics; cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub gangs_placed: Counter,
    pub gangs_unplaceable: Gauge<i64, AtomicI64>,
    pub leader: Gauge<i64, AtomicI64>,
    planner_decisions: Family<DecisionLabels, Counter>,
    planner_replicas: Family<PlannerLabels, Gauge<i64, AtomicI64>>,
    planner_observed_rate: Family<PlannerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    planner_predicted_rate: Family<PlannerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dynamo_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
            0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let gangs_placed = Counter::default();
        let gangs_unplaceable = Gauge::<i64, AtomicI64>::default();
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register("reconciles", "Graph reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Graph reconciles that failed, by error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one graph reconcile took",
            duration.clone(),
        );
        registry.register(
            "gangs_placed",
            "Gangs pinned and un-gated",
            gangs_placed.clone(),
        );
        registry.register(
            "gangs_unplaceable",
            "Gangs that fit in no topology domain right now",
            gangs_unplaceable.clone(),
        );
        registry.register("leader", "1 while this process leads", leader.clone());
        let planner = registry.sub_registry_with_prefix("planner");
        let planner_decisions = Family::<DecisionLabels, Counter>::default();
        planner.register(
            "decisions",
            "SLA planner decisions, by graph, path (predictive, reactive, hold) and whether they were carried out",
            planner_decisions.clone(),
        );
        let planner_replicas = Family::<PlannerLabels, Gauge<i64, AtomicI64>>::default();
        planner.register(
            "replicas",
            "Replicas the SLA planner last chose, by graph and service",
            planner_replicas.clone(),
        );
        let planner_observed_rate =
            Family::<PlannerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        planner.register(
            "observed_requests_per_second",
            "Request rate the planner last observed (engine time)",
            planner_observed_rate.clone(),
        );
        let planner_predicted_rate =
            Family::<PlannerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        planner.register(
            "predicted_requests_per_second",
            "Request rate the planner forecast for its next interval (engine time)",
            planner_predicted_rate.clone(),
        );
        Metrics {
            planner_decisions,
            planner_replicas,
            planner_observed_rate,
            planner_predicted_rate,
            reconciles,
            failures,
            duration,
            gangs_placed,
            gangs_unplaceable,
            leader,
            registry: Arc::new(registry),
        }
    }
}

impl Metrics {
    /// Records one planner decision (`dynamo_operator_planner_*`): `services` names the
    /// service of each planned pool.
    pub fn planner_decision(
        &self,
        graph: &str,
        services: &std::collections::BTreeMap<dynamo_planner::Pool, String>,
        d: &dynamo_planner::Decision,
        acted: bool,
    ) {
        self.planner_decisions
            .get_or_create(&DecisionLabels {
                graph: graph.to_owned(),
                path: d.path.as_str(),
                acted: if acted { "true" } else { "false" },
            })
            .inc();
        for (pool, service) in services {
            let labels = PlannerLabels {
                graph: graph.to_owned(),
                service: service.clone(),
            };
            self.planner_replicas
                .get_or_create(&labels)
                .set(i64::from(d.replicas.get(*pool)));
            if let Some(o) = &d.observed {
                self.planner_observed_rate
                    .get_or_create(&labels)
                    .set(o.rate);
            }
            if let Some(p) = &d.predicted {
                self.planner_predicted_rate
                    .get_or_create(&labels)
                    .set(p.rate);
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    healthy: Arc<AtomicBool>,
}

/// Serves `/metrics` and `/healthz` until `cancel` fires. `healthy` turns `/healthz` to 503
/// (set false while shutting down).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    healthy: Arc<AtomicBool>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .with_state(HttpState { metrics, healthy });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.healthy.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    }
}
