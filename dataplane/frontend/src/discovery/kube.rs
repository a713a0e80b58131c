//! Kubernetes discovery: the Ready endpoints of the graph's worker Services.
//!
//! The operator gives every worker service a Service whose endpoints follow pod readiness
//! (`publishNotReadyAddresses: false`) with a port named `grpc`, labelled
//! `nvidia.com/dynamo-graph=<graph>` and `nvidia.com/dynamo-discovery=worker`; the EndpointSlice
//! controller copies those labels onto the slices. This source watches the slices in the
//! frontend's namespace by that selector and nominates `http://<address>:<grpc port>` for every
//! endpoint whose `ready` condition is not false. Bursts of changes (a rollout, a node going away)
//! are coalesced over [`DEBOUNCE`] before the pool sees them.
//!
//! Nothing here assumes where pods run: the pool admits a candidate only once its `Info` answers.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use super::{Discovery, DiscoveryError};

/// Label on worker Services (and so on their EndpointSlices) that marks them for discovery.
pub const LABEL_DISCOVERY: &str = "nvidia.com/dynamo-discovery";
/// Label naming the graph.
pub const LABEL_GRAPH: &str = "nvidia.com/dynamo-graph";
/// Name of the worker Services' gRPC port.
pub const GRPC_PORT_NAME: &str = "grpc";
/// How long changes are collected before a new candidate set is published.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// The EndpointSlice selector of a graph's workers.
pub fn selector(graph: &str) -> String {
    format!("{LABEL_GRAPH}={graph},{LABEL_DISCOVERY}=worker")
}

/// Ready `http://address:port` URLs of one slice.
pub fn ready_urls(slice: &EndpointSlice) -> Vec<String> {
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(GRPC_PORT_NAME))
        .and_then(|p| p.port)
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter())
        .map(|a| {
            if a.contains(':') {
                format!("http://[{a}]:{port}")
            } else {
                format!("http://{a}:{port}")
            }
        })
        .collect()
}

type SliceStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<watcher::Event<EndpointSlice>, watcher::Error>> + Send>,
>;

/// Watches a graph's worker EndpointSlices.
pub struct Kubernetes {
    namespace: String,
    selector: String,
    stream: SliceStream,
    slices: BTreeMap<String, Vec<String>>,
    /// Slices seen during an initial (re)list, swapped in at `InitDone`.
    relist: Option<BTreeMap<String, Vec<String>>>,
    last: Option<BTreeSet<String>>,
}

impl Kubernetes {
    /// Connects with the in-cluster config (or `KUBECONFIG`) and watches `namespace`.
    pub async fn connect(namespace: &str, graph: &str) -> Result<Kubernetes, DiscoveryError> {
        let client = Client::try_default()
            .await
            .map_err(DiscoveryError::KubeClient)?;
        Ok(Self::with_client(client, namespace, graph))
    }

    pub fn with_client(client: Client, namespace: &str, graph: &str) -> Kubernetes {
        let selector = selector(graph);
        let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
        let stream = watcher(api, watcher::Config::default().labels(&selector))
            .default_backoff()
            .boxed();
        Kubernetes {
            namespace: namespace.to_owned(),
            selector,
            stream,
            slices: BTreeMap::new(),
            relist: None,
            last: None,
        }
    }

    fn current(&self) -> BTreeSet<String> {
        self.slices.values().flatten().cloned().collect()
    }

    /// Applies one watch event; whether the candidate set may have changed.
    fn apply(&mut self, event: watcher::Event<EndpointSlice>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(s) => {
                if let Some(relist) = &mut self.relist {
                    relist.insert(s.name_any(), ready_urls(&s));
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.slices = relist;
                }
                true
            }
            watcher::Event::Apply(s) => {
                self.slices.insert(s.name_any(), ready_urls(&s));
                true
            }
            watcher::Event::Delete(s) => {
                self.slices.remove(&s.name_any());
                true
            }
        }
    }
}

impl Discovery for Kubernetes {
    async fn next(&mut self) -> Result<Option<BTreeSet<String>>, DiscoveryError> {
        loop {
            let Some(event) = self.stream.next().await else {
                return Ok(None);
            };
            // The watcher retries with backoff after an error; the last set stays in force.
            let event = match event {
                Ok(event) => event,
                Err(source) => {
                    let error = DiscoveryError::KubeWatch {
                        namespace: self.namespace.clone(),
                        selector: self.selector.clone(),
                        source,
                    };
                    tracing::warn!(error = %anyhow::Error::from(error), "EndpointSlice watch failed; retrying");
                    continue;
                }
            };
            if !self.apply(event) {
                continue;
            }
            // Coalesce a burst: keep applying what arrives within the debounce window.
            let deadline = tokio::time::Instant::now() + DEBOUNCE;
            loop {
                match tokio::time::timeout_at(deadline, self.stream.next()).await {
                    Ok(Some(Ok(event))) => {
                        self.apply(event);
                    }
                    Ok(Some(Err(error))) => {
                        tracing::warn!(%error, "EndpointSlice watch error; retrying");
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let set = self.current();
            if self.last.as_ref() != Some(&set) {
                self.last = Some(set.clone());
                return Ok(Some(set));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_endpoints_on_the_grpc_port_are_candidates() {
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![
                endpoint("10.0.0.1", Some(true)),
                endpoint("10.0.0.2", Some(false)),
                endpoint("10.0.0.3", None),
            ],
            ports: Some(vec![
                EndpointPort {
                    name: Some("metrics".into()),
                    port: Some(9100),
                    ..Default::default()
                },
                EndpointPort {
                    name: Some("grpc".into()),
                    port: Some(9000),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        assert_eq!(
            ready_urls(&slice),
            ["http://10.0.0.1:9000", "http://10.0.0.3:9000"]
        );
        let no_port = EndpointSlice {
            ports: None,
            ..slice
        };
        assert!(ready_urls(&no_port).is_empty());
    }

    #[test]
    fn the_selector_names_the_graph_and_the_worker_role() {
        assert_eq!(
            selector("agg"),
            "nvidia.com/dynamo-graph=agg,nvidia.com/dynamo-discovery=worker"
        );
    }
}
