//! The frontend's Prometheus metrics, named as NVIDIA Dynamo names them so existing dashboards work:
//! `dynamo_frontend_requests_total`, `..._time_to_first_token_seconds`, `..._inter_token_latency_seconds`,
//! `..._request_duration_seconds`, `..._inflight_requests`, `..._input_sequence_tokens`,
//! `..._output_sequence_tokens`, `..._cached_tokens`, `..._model_migration_total{migration_type}`,
//! each with a `model` label. The `kv` router's `dynamo_router_*` metrics are registered in the
//! same registry: one registry, one encoder, one `/metrics`.

use dynamo_kv::policy::KvRouter;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub model: String,
    pub migration_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub endpoint: &'static str,
    pub request_type: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

/// The fleet as the frontend sees it, per role, at one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetView {
    pub workers: i64,
    pub gpus: i64,
    pub inflight: i64,
    pub pending_prefill_tokens: i64,
    /// KV blocks the frontend's requests hold on the workers, and the workers' KV blocks.
    pub kv_blocks_active: i64,
    pub kv_blocks_total: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: String,
}

type HistFamily = Family<ModelLabel, Histogram, fn() -> Histogram>;

pub struct FrontendMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    migrations: Family<MigrationLabels, Counter>,
    model: ModelLabel,
    /// Per-model handles, created once (the frontend serves one model).
    pub inflight: Gauge,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub duration: Histogram,
    pub isl: Histogram,
    pub osl: Histogram,
    pub cached: Histogram,
    pub tokenize: Histogram,
    /// Disaggregation: where prompts were prefilled and why; prefills that fell back to local.
    disagg: Family<DecisionLabels, Counter>,
    disagg_tokens: Family<DecisionLabel, Counter>,
    pub disagg_prefill_cached: Counter,
    prefill_fallbacks: Family<ReasonLabel, Counter>,
    /// What decode workers pulled (`dynamo_kv_transfer_*{transport}`).
    transfer_bytes: Family<TransportLabel, Counter>,
    transfer_blocks: Family<TransportLabel, Counter>,
    transfer_seconds: Family<TransportLabel, Histogram, fn() -> Histogram>,
    /// Time of the prefill leg (pick, queue, compute, parameters back).
    pub prefill_leg: Histogram,
    /// The live fleet by role (`aggregated`, `prefill`, `decode`), set at each scrape.
    fleet_workers: Family<RoleLabel, Gauge>,
    fleet_gpus: Family<RoleLabel, Gauge>,
    fleet_inflight: Family<RoleLabel, Gauge>,
    fleet_pending_prefill: Family<RoleLabel, Gauge>,
    fleet_kv_active: Family<RoleLabel, Gauge>,
    fleet_kv_total: Family<RoleLabel, Gauge>,
    sla: Family<MetLabel, Counter>,
    sla_misses: Family<TargetLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetLabel {
    pub met: &'static str,
}

fn exp(start: f64, factor: f64, n: u16) -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(start, factor, n)
}

impl FrontendMetrics {
    /// The frontend's metrics for `model`, and the `kv` router's when there is one.
    pub fn new(model: &str, kv: Option<&KvRouter>) -> FrontendMetrics {
        let mut root = Registry::default();
        if let Some(kv) = kv {
            kv.register_metrics(&mut root, model);
        }
        let transfer_bytes = Family::<TransportLabel, Counter>::default();
        let transfer_blocks = Family::<TransportLabel, Counter>::default();
        let transfer_seconds: Family<TransportLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exp(0.0001, 2.0, 18)));
        {
            let kv = root.sub_registry_with_prefix("dynamo_kv_transfer");
            kv.register(
                "bytes",
                "KV bytes decode workers pulled from prefill workers, by transport",
                transfer_bytes.clone(),
            );
            kv.register(
                "blocks",
                "KV blocks decode workers pulled from prefill workers, by transport",
                transfer_blocks.clone(),
            );
            kv.register(
                "seconds",
                "Wall time of one pull, by transport",
                transfer_seconds.clone(),
            );
        }
        let registry = root.sub_registry_with_prefix("dynamo_frontend");
        let disagg = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "disagg_decisions",
            "Where prompts were prefilled (remote: the prefill pool; local: the decode worker), by the policy's reason",
            disagg.clone(),
        );
        let disagg_tokens = Family::<DecisionLabel, Counter>::default();
        registry.register(
            "disagg_prompt_tokens",
            "Prompt tokens of the requests counted in disagg_decisions, by where they were prefilled (the planner sizes the prefill pool from them)",
            disagg_tokens.clone(),
        );
        let disagg_prefill_cached = Counter::default();
        registry.register(
            "disagg_prefill_cached_tokens",
            "Prompt tokens of the remote prefills that the prefill workers found in their caches (of disagg_prompt_tokens{decision=\"remote\"}; the planner sizes the prefill pool on the rest)",
            disagg_prefill_cached.clone(),
        );
        let prefill_fallbacks = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "prefill_fallbacks",
            "Remote prefills that did not happen or did not arrive, by reason (the request went on)",
            prefill_fallbacks.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests handled, by endpoint, type and status",
            requests.clone(),
        );
        let migrations = Family::<MigrationLabels, Counter>::default();
        registry.register(
            "model_migration",
            "Requests moved to another worker after theirs failed, by when (new_request: before the first token; ongoing_request: mid-stream)",
            migrations.clone(),
        );
        let label = ModelLabel {
            model: model.to_owned(),
        };
        let inflight = Family::<ModelLabel, Gauge>::default();
        registry.register("inflight_requests", "Requests in flight", inflight.clone());
        let mut hist = |name: &str, help: &str, make: fn() -> Histogram| {
            let fam: HistFamily = Family::new_with_constructor(make);
            registry.register(name, help, fam.clone());
            fam.get_or_create(&label).clone()
        };
        let ttft = hist("time_to_first_token_seconds", "Time to first token", || {
            Histogram::new(exp(0.001, 2.0, 17))
        });
        let itl = hist(
            "inter_token_latency_seconds",
            "Time between tokens of a response",
            || Histogram::new(exp(0.0001, 2.0, 16)),
        );
        let duration = hist("request_duration_seconds", "Request duration", || {
            Histogram::new(exp(0.001, 2.0, 20))
        });
        let isl = hist("input_sequence_tokens", "Prompt length in tokens", || {
            Histogram::new(exp(1.0, 2.0, 19))
        });
        let osl = hist(
            "output_sequence_tokens",
            "Generated tokens per request",
            || Histogram::new(exp(1.0, 2.0, 17)),
        );
        let cached = hist(
            "cached_tokens",
            "Prompt tokens served from the prefix cache",
            || Histogram::new(exp(1.0, 2.0, 19)),
        );
        let tokenize = hist(
            "tokenize_seconds",
            "Chat template rendering and tokenization time",
            || Histogram::new(exp(0.00001, 2.0, 18)),
        );
        let prefill_leg = hist(
            "prefill_leg_seconds",
            "Time of a remote prefill: queue and compute on the prefill worker",
            || Histogram::new(exp(0.001, 2.0, 17)),
        );
        let inflight = inflight.get_or_create(&label).clone();
        let mut fleet = |name: &str, help: &str| {
            let fam = Family::<RoleLabel, Gauge>::default();
            registry.register(name, help, fam.clone());
            fam
        };
        let fleet_workers = fleet("live_workers", "Workers the frontend routes to, by role");
        let fleet_gpus = fleet(
            "worker_gpus",
            "GPUs of the workers the frontend routes to, by role (what a fleet costs)",
        );
        let fleet_inflight = fleet(
            "worker_inflight_requests",
            "Requests the frontend has in flight on its workers, by role",
        );
        let fleet_pending_prefill = fleet(
            "worker_pending_prefill_tokens",
            "Prompt tokens routed to workers and not yet prefilled, by role (queued prefill)",
        );
        let fleet_kv_active = fleet(
            "worker_kv_blocks_active",
            "KV blocks the requests in flight hold on the workers, as the router booked them, by role",
        );
        let fleet_kv_total = fleet(
            "worker_kv_blocks_total",
            "KV blocks of the workers the frontend routes to, by role",
        );
        let sla = Family::<MetLabel, Counter>::default();
        registry.register(
            "sla_requests",
            "Finished requests by whether they met both SLA targets (--sla-ttft-ms, --sla-itl-ms; mean ITL)",
            sla.clone(),
        );
        let sla_misses = Family::<TargetLabel, Counter>::default();
        registry.register(
            "sla_misses",
            "Finished requests that missed a target, by target (ttft, itl)",
            sla_misses.clone(),
        );
        FrontendMetrics {
            sla,
            sla_misses,
            registry: root,
            requests,
            migrations,
            model: label,
            inflight,
            ttft,
            itl,
            duration,
            isl,
            osl,
            cached,
            tokenize,
            disagg,
            disagg_tokens,
            disagg_prefill_cached,
            prefill_fallbacks,
            transfer_bytes,
            transfer_blocks,
            transfer_seconds,
            prefill_leg,
            fleet_workers,
            fleet_gpus,
            fleet_inflight,
            fleet_pending_prefill,
            fleet_kv_active,
            fleet_kv_total,
        }
    }

    /// Counts one finished request against the SLA: whether it met both targets, and which it
    /// missed (a failed request misses both).
    pub fn count_sla(&self, ttft_ok: bool, itl_ok: bool) {
        let met = ttft_ok && itl_ok;
        self.sla
            .get_or_create(&MetLabel {
                met: if met { "true" } else { "false" },
            })
            .inc();
        for (ok, target) in [(ttft_ok, "ttft"), (itl_ok, "itl")] {
            if !ok {
                self.sla_misses.get_or_create(&TargetLabel { target }).inc();
            }
        }
    }

    /// Sets the fleet gauges: one entry per role the graph has had (a role with no live worker
    /// left reads 0).
    pub fn set_fleet(&self, roles: &[(&'static str, FleetView)]) {
        for (role, v) in roles {
            let l = RoleLabel { role };
            self.fleet_workers.get_or_create(&l).set(v.workers);
            self.fleet_gpus.get_or_create(&l).set(v.gpus);
            self.fleet_inflight.get_or_create(&l).set(v.inflight);
            self.fleet_pending_prefill
                .get_or_create(&l)
                .set(v.pending_prefill_tokens);
            self.fleet_kv_active
                .get_or_create(&l)
                .set(v.kv_blocks_active);
            self.fleet_kv_total.get_or_create(&l).set(v.kv_blocks_total);
        }
    }

    pub fn count_disagg(&self, decision: crate::disagg::Decision, prompt_tokens: u64) {
        let (decision, reason) = match decision {
            crate::disagg::Decision::Remote(r) => ("remote", r),
            crate::disagg::Decision::Local(r) => ("local", r),
        };
        self.disagg
            .get_or_create(&DecisionLabels { decision, reason })
            .inc();
        self.disagg_tokens
            .get_or_create(&DecisionLabel { decision })
            .inc_by(prompt_tokens);
    }

    pub fn count_prefill_fallback(&self, reason: &'static str) {
        self.prefill_fallbacks
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn count_transfer(&self, report: &dynamo_protocol::proto::KvTransferReport) {
        let label = TransportLabel {
            transport: report.transport.clone(),
        };
        self.transfer_bytes
            .get_or_create(&label)
            .inc_by(report.bytes);
        self.transfer_blocks
            .get_or_create(&label)
            .inc_by(report.blocks);
        self.transfer_seconds
            .get_or_create(&label)
            .observe(report.micros as f64 / 1e6);
    }

    pub fn count_request(&self, endpoint: &'static str, stream: bool, ok: bool) {
        self.requests
            .get_or_create(&RequestLabels {
                model: self.model.model.clone(),
                endpoint,
                request_type: if stream { "stream" } else { "unary" },
                status: if ok { "success" } else { "error" },
            })
            .inc();
    }

    pub fn count_migration(&self, migration_type: &'static str) {
        self.migrations
            .get_or_create(&MigrationLabels {
                model: self.model.model.clone(),
                migration_type,
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = encode(&mut out, &self.registry) {
            tracing::warn!(%error, "could not encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_match_dynamo() {
        let kv = KvRouter::new(dynamo_kv::policy::KvRouterConfig::default());
        let m = FrontendMetrics::new("tiny", Some(&kv));
        m.count_request("chat_completions", true, true);
        m.count_migration("ongoing_request");
        m.ttft.observe(0.01);
        m.inflight.inc();
        let text = m.encode();
        for name in [
            "dynamo_frontend_requests_total{",
            "dynamo_frontend_time_to_first_token_seconds_bucket{",
            "dynamo_frontend_inter_token_latency_seconds_sum{",
            "dynamo_frontend_request_duration_seconds_count{",
            "dynamo_frontend_inflight_requests{model=\"tiny\"} 1",
            "dynamo_frontend_input_sequence_tokens_sum{",
            "dynamo_frontend_output_sequence_tokens_sum{",
            "dynamo_frontend_cached_tokens_sum{",
            "dynamo_frontend_model_migration_total{model=\"tiny\",migration_type=\"ongoing_request\"} 1",
            "dynamo_router_decisions_total{model=\"tiny\"} 0",
            "dynamo_router_indexed_blocks{model=\"tiny\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(text.contains("status=\"success\""));
    }
}
