//! Process settings of the operator (flags, each also a `DYN_*` variable), validated once into
//! [`Config`]. What a graph does comes from its CRD, not from here.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::placement::{DEFAULT_TOPOLOGY_LEVELS, TopologyLevels};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "dynamo-operator",
    about = "Reconciles DynamoGraphDeployments into topology-packed pod gangs"
)]
pub struct Args {
    /// Topology levels, broadest first, as NAME=NODE_LABEL,...; `packDomain` names one of them.
    #[arg(long, env = "DYN_TOPOLOGY_LEVELS", default_value = DEFAULT_TOPOLOGY_LEVELS)]
    pub topology_levels: String,
    /// A gang with some but not all pods bound for this long is deleted and placed again.
    #[arg(long, env = "DYN_GANG_DEADLINE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub gang_deadline: Duration,
    /// During a rolling update, a new gang counts as available only once every pod of it has been
    /// Ready this long, and the next old gang goes only then: routers (the frontend's discovery)
    /// admit a new worker a moment after its pod turns Ready. Like a Deployment's minReadySeconds.
    #[arg(long, env = "DYN_MIN_READY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub min_ready: Duration,
    /// Only watch graphs in this namespace (empty: all namespaces).
    #[arg(long, env = "DYN_WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,
    /// Image for services whose mainContainer has none.
    #[arg(long, env = "DYN_DEFAULT_IMAGE", default_value = "dynamo-rs:latest")]
    pub default_image: String,
    /// Address of /metrics and /healthz.
    #[arg(long, env = "DYN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Take a Lease before reconciling, so only one replica acts.
    #[arg(long, env = "DYN_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    #[arg(long, env = "DYN_LEASE_NAME", default_value = "dynamo-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the chart sets the release namespace).
    #[arg(long, env = "DYN_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    #[arg(long, env = "DYN_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// This replica's name in the Lease and in Events (the chart sets the pod name).
    #[arg(long, env = "DYN_IDENTITY", default_value = "")]
    pub identity: String,
    /// Graphs reconciled at once.
    #[arg(long, env = "DYN_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "DYN_LOG", default_value = "info")]
    pub log: String,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub levels: TopologyLevels,
    pub gang_deadline: Duration,
    pub min_ready: Duration,
    pub watch_namespace: Option<String>,
    pub default_image: String,
    pub metrics_addr: SocketAddr,
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_namespace: String,
    pub lease_duration: Duration,
    pub identity: String,
    pub concurrency: u16,
}

impl Args {
    pub fn validate(self) -> Result<Config, String> {
        let levels = TopologyLevels::parse(&self.topology_levels)
            .map_err(|e| format!("--topology-levels / DYN_TOPOLOGY_LEVELS: {e}"))?;
        if self.lease_duration < Duration::from_secs(3) {
            return Err("--lease-duration must be at least 3s".into());
        }
        let identity = if self.identity.is_empty() {
            format!("dynamo-operator-{}", std::process::id())
        } else {
            self.identity
        };
        Ok(Config {
            levels,
            gang_deadline: self.gang_deadline,
            min_ready: self.min_ready,
            watch_namespace: (!self.watch_namespace.is_empty()).then_some(self.watch_namespace),
            default_image: self.default_image,
            metrics_addr: self.metrics_addr,
            leader_election: self.leader_election,
            lease_name: self.lease_name,
            lease_namespace: self.lease_namespace,
            lease_duration: self.lease_duration,
            identity,
            concurrency: self.concurrency.max(1),
        })
    }
}
