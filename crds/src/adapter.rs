//! `DynamoGraphDeploymentScalingAdapter` (`dgdsa`): one per service of a graph, with the scale
//! subresource, so `kubectl scale`, HPA, KEDA or the SLA planner can change a service's gang count
//! without editing the graph. The operator creates them (seeded from the graph's `replicas`) and
//! then treats their `spec.replicas` as the service's replica count.

// kube's `printcolumn(...)` entries repeat `type_ = ...`; clippy mistakes that for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "nvidia.com",
    version = "v1alpha1",
    kind = "DynamoGraphDeploymentScalingAdapter",
    namespaced,
    shortname = "dgdsa",
    status = "ScalingAdapterStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "The replica count of one service of a DynamoGraphDeployment, scalable through the scale subresource.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "DGD", type_ = "string", json_path = ".spec.dgdRef.name"),
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.dgdRef.service"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Current", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ScalingAdapterSpec {
    /// Gangs wanted for the service.
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// The graph and service this adapter scales.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "dgdRef cannot be changed; create a new adapter instead"}
    ]))]
    pub dgd_ref: GraphServiceRef,
}

/// A service of a DynamoGraphDeployment in the adapter's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GraphServiceRef {
    /// Name of the DynamoGraphDeployment.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the service in the graph's `spec.services`.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingAdapterStatus {
    /// Gangs that exist for the service.
    #[serde(default)]
    pub replicas: i32,
    /// Gangs with every pod ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the service's pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// RFC 3339 time the service's gang count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
}
