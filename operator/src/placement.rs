//! Gang placement: pick one topology domain where a whole gang fits, and a node for each of its
//! pods. Pure: it sees a [`ClusterView`] (nodes with free GPUs and topology labels) built by the
//! controller, and never talks to the API server.
//!
//! Rules:
//! - every pod of a gang goes to its own node (ranks are separate processes with their own GPUs);
//! - a node takes a pod when its free `nvidia.com/gpu` (allocatable minus what bound or pinned pods
//!   request) covers the pod's GPUs, it has a free pod slot, the pod tolerates its taints, and it
//!   satisfies the pod's `nodeSelector` and required node affinity (so pinning, which narrows that
//!   affinity to the chosen node, never leaves a pod nowhere to go);
//! - the gang's pods all land in one domain of the required level (`packDomain`); among the
//!   domains where the gang fits, the one with the fewest free GPUs left afterwards wins (best fit,
//!   keeping big holes for big gangs), and inside it the nodes with the least free GPUs that still
//!   fit; ties break by name, so a placement is deterministic;
//! - without a `packDomain`, a gang of several pods is packed as tightly as the cluster allows: the
//!   narrowest level above host where it fits, then broader ones, then anywhere; a one-pod gang
//!   takes the best-fitting node anywhere.

use std::collections::BTreeMap;

/// A topology level: a name users write in `packDomain` and the node label that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    pub name: String,
    pub label: String,
}

/// Topology levels, broadest first (e.g. zone, rack, host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyLevels(Vec<Level>);

/// The levels the chart and the operator use unless told otherwise.
pub const DEFAULT_TOPOLOGY_LEVELS: &str = "zone=topology.kubernetes.io/zone,rack=topology.dynamo.nvidia.com/rack,host=kubernetes.io/hostname";

impl TopologyLevels {
    /// Parses `name=label,name=label,...`, broadest first.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut levels = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, label)) = part.split_once('=') else {
                return Err(format!(
                    "topology level {part:?} is not NAME=NODE_LABEL (e.g. rack=topology.dynamo.nvidia.com/rack)"
                ));
            };
            let (name, label) = (name.trim(), label.trim());
            if name.is_empty() || label.is_empty() {
                return Err(format!(
                    "topology level {part:?} has an empty name or label"
                ));
            }
            if levels.iter().any(|l: &Level| l.name == name) {
                return Err(format!("topology level {name:?} is listed twice"));
            }
            levels.push(Level {
                name: name.into(),
                label: label.into(),
            });
        }
        if levels.is_empty() {
            return Err("no topology levels given".into());
        }
        Ok(TopologyLevels(levels))
    }

    pub fn levels(&self) -> &[Level] {
        &self.0
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|l| l.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|l| l.name.as_str()).collect()
    }
}

impl Default for TopologyLevels {
    fn default() -> Self {
        // The constant is well formed; a test pins that.
        TopologyLevels::parse(DEFAULT_TOPOLOGY_LEVELS).unwrap_or(TopologyLevels(Vec::new()))
    }
}

/// A taint that keeps pods off a node unless they tolerate it (`NoSchedule` / `NoExecute`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

/// A pod's toleration, as in the Pod API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Toleration {
    pub key: String,
    /// `Exists` or `Equal` (the default).
    pub operator: String,
    pub value: String,
    /// Empty matches every effect.
    pub effect: String,
}

impl Toleration {
    fn tolerates(&self, t: &Taint) -> bool {
        if !self.effect.is_empty() && self.effect != t.effect {
            return false;
        }
        if self.operator == "Exists" {
            return self.key.is_empty() || self.key == t.key;
        }
        self.key == t.key && self.value == t.value
    }
}

/// One node selector requirement of a pod's node affinity (a `matchExpressions` or `matchFields`
/// entry), as in the Pod API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt` or `Lt`.
    pub operator: String,
    pub values: Vec<String>,
}

impl Requirement {
    /// Whether a node whose label (or field) `key` is `value` satisfies this. As in the
    /// scheduler, a malformed requirement (an unknown operator, `In` without values, `Gt` without
    /// exactly one integer) is satisfied by no node.
    fn matches(&self, value: Option<&str>) -> bool {
        let listed = |v: &str| self.values.iter().any(|x| x == v);
        match (self.operator.as_str(), self.values.as_slice()) {
            ("In", [_, ..]) => value.is_some_and(listed),
            ("NotIn", [_, ..]) => value.is_none_or(|v| !listed(v)),
            ("Exists", []) => value.is_some(),
            ("DoesNotExist", []) => value.is_none(),
            (op @ ("Gt" | "Lt"), [bound]) => {
                let have = value.and_then(|v| v.parse::<i64>().ok());
                match (have, bound.parse::<i64>()) {
                    (Some(have), Ok(bound)) if op == "Gt" => have > bound,
                    (Some(have), Ok(bound)) => have < bound,
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

/// One of a pod's required `nodeSelectorTerms`: all its requirements hold. A term without any
/// matches no node, as in the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeTerm {
    /// On the node's labels.
    pub match_expressions: Vec<Requirement>,
    /// On the node's fields; the API allows only `metadata.name`.
    pub match_fields: Vec<Requirement>,
}

impl NodeTerm {
    fn matches(&self, node: &NodeInfo) -> bool {
        let field = |key: &str| (key == "metadata.name").then_some(node.name.as_str());
        (!self.match_expressions.is_empty() || !self.match_fields.is_empty())
            && self
                .match_expressions
                .iter()
                .all(|r| r.matches(node.labels.get(&r.key).map(String::as_str)))
            && self.match_fields.iter().all(|r| r.matches(field(&r.key)))
    }
}

/// What the pod itself says about the nodes it may run on: its `nodeSelector` and
/// `affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeConstraints {
    /// Labels the node must carry, each with this value.
    pub node_selector: BTreeMap<String, String>,
    /// Terms of which at least one must hold; `None` when the pod has no required node affinity.
    pub required_terms: Option<Vec<NodeTerm>>,
}

impl NodeConstraints {
    /// Whether the pod may run on `node`.
    pub fn allows(&self, node: &NodeInfo) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
            && self
                .required_terms
                .as_ref()
                .is_none_or(|terms| terms.iter().any(|t| t.matches(node)))
    }
}

/// What placement needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub free_gpus: u32,
    pub free_pods: u32,
    pub taints: Vec<Taint>,
}

/// Nodes that can take pods (ready and schedulable), with their free capacity.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    nodes: BTreeMap<String, NodeInfo>,
}

impl ClusterView {
    pub fn new(nodes: impl IntoIterator<Item = NodeInfo>) -> Self {
        ClusterView {
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Takes capacity for a pod that is bound or pinned to `node`.
    pub fn reserve(&mut self, node: &str, gpus: u32) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.free_gpus = n.free_gpus.saturating_sub(gpus);
            n.free_pods = n.free_pods.saturating_sub(1);
        }
    }

    /// Places a gang and reserves its capacity; on failure says why.
    pub fn place(
        &mut self,
        levels: &TopologyLevels,
        gang: &GangRequest,
    ) -> Result<Placement, NoFit> {
        let placement = self.find(levels, gang)?;
        for node in &placement.nodes {
            self.reserve(node, gang.gpus_per_pod);
        }
        Ok(placement)
    }

    /// Where the gang would go, without reserving anything.
    pub fn find(&self, levels: &TopologyLevels, gang: &GangRequest) -> Result<Placement, NoFit> {
        let eligible: Vec<&NodeInfo> = self
            .nodes
            .values()
            .filter(|n| {
                n.free_pods > 0
                    && n.free_gpus >= gang.gpus_per_pod
                    && n.taints
                        .iter()
                        .all(|t| gang.tolerations.iter().any(|tol| tol.tolerates(t)))
                    && gang.node_constraints.allows(n)
            })
            .collect();
        let attempts: Vec<Option<usize>> = match &gang.pack_domain {
            PackDomain::Level(i) => vec![Some(*i)],
            PackDomain::Anywhere => vec![None],
            PackDomain::Tightest => {
                // Narrowest level above host first (host itself cannot hold several pods, and a
                // one-pod gang is on one host anyway), then broader, then anywhere.
                let n = levels.levels().len();
                let mut v: Vec<Option<usize>> = if gang.pods > 1 {
                    (0..n.saturating_sub(1)).rev().map(Some).collect()
                } else {
                    Vec::new()
                };
                v.push(None);
                v
            }
        };
        for level in &attempts {
            if let Some(p) = best_domain(&eligible, levels, *level, gang) {
                return Ok(p);
            }
        }
        Err(self.no_fit(levels, gang, attempts.first().copied().flatten()))
    }

    fn no_fit(&self, levels: &TopologyLevels, gang: &GangRequest, level: Option<usize>) -> NoFit {
        // The largest free domain at the level asked for (or the whole cluster), among the nodes
        // the pod may run on.
        let mut free: BTreeMap<String, u32> = BTreeMap::new();
        let mut excluded = 0;
        for n in self.nodes.values() {
            if !gang.node_constraints.allows(n) {
                excluded += 1;
                continue;
            }
            let key = match level {
                Some(i) => match n.labels.get(&levels.levels()[i].label) {
                    Some(v) => v.clone(),
                    None => continue,
                },
                None => "cluster".to_string(),
            };
            *free.entry(key).or_default() += n.free_gpus;
        }
        let largest = free
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        NoFit {
            level: level.map(|i| levels.levels()[i].name.clone()),
            gpus_needed: gang.gpus_per_pod * gang.pods,
            pods: gang.pods,
            largest_free_domain: largest,
            ready_nodes: self.nodes.len(),
            excluded_by_pod: excluded,
        }
    }
}

/// The level a gang must be packed into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackDomain {
    /// One domain of this level (index into [`TopologyLevels`]).
    Level(usize),
    /// As tight as the cluster allows (no `packDomain` given).
    Tightest,
    /// Any nodes.
    Anywhere,
}

/// One gang to place.
#[derive(Debug, Clone)]
pub struct GangRequest {
    pub pods: u32,
    pub gpus_per_pod: u32,
    pub pack_domain: PackDomain,
    pub tolerations: Vec<Toleration>,
    /// The pod's `nodeSelector` and required node affinity (the gang's pods share a template).
    pub node_constraints: NodeConstraints,
}

/// Nodes for ranks 0..pods, and the domain they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub nodes: Vec<String>,
    /// `(level, value)`, e.g. `("rack", "r1")`; `None` when placed anywhere.
    pub domain: Option<(String, String)>,
}

/// Why a gang fits nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoFit {
    pub level: Option<String>,
    pub gpus_needed: u32,
    pub pods: u32,
    /// The domain (at the level asked for) with the most free GPUs, and how many, counting only
    /// nodes the pod's own constraints allow.
    pub largest_free_domain: Option<(String, u32)>,
    /// Ready, schedulable nodes in all.
    pub ready_nodes: usize,
    /// Of those, how many the pod's `nodeSelector` or required node affinity rules out.
    pub excluded_by_pod: usize,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_pod = self.gpus_needed.checked_div(self.pods).unwrap_or(0);
        let scope = match &self.level {
            Some(l) => format!("inside one {l}"),
            None => "in the cluster".to_string(),
        };
        write!(
            f,
            "needs {} nodes with {per_pod} free GPUs each ({} GPUs) {scope}, and none has that free; ",
            self.pods, self.gpus_needed
        )?;
        if self.excluded_by_pod > 0 {
            if self.excluded_by_pod >= self.ready_nodes {
                return write!(f, "the pod's nodeSelector/affinity matches no ready node");
            }
            write!(
                f,
                "the pod's nodeSelector/affinity rules out {} of {} ready nodes; among the rest, ",
                self.excluded_by_pod, self.ready_nodes
            )?;
        }
        match (&self.largest_free_domain, &self.level) {
            (Some((d, g)), Some(l)) => {
                write!(f, "the {l} with the most free GPUs is {d} with {g}")
            }
            (Some((_, g)), None) => write!(f, "{g} GPUs are free in all"),
            (None, Some(l)) => write!(f, "no ready node carries the {l} label"),
            (None, None) => write!(f, "no node is ready"),
        }
    }
}

fn best_domain(
    eligible: &[&NodeInfo],
    levels: &TopologyLevels,
    level: Option<usize>,
    gang: &GangRequest,
) -> Option<Placement> {
    let mut domains: BTreeMap<&str, Vec<&NodeInfo>> = BTreeMap::new();
    for n in eligible {
        let key = match level {
            Some(i) => match n.labels.get(&levels.levels()[i].label) {
                Some(v) => v.as_str(),
                None => continue,
            },
            None => "",
        };
        domains.entry(key).or_default().push(n);
    }
    let mut best: Option<(u64, Placement)> = None;
    for (value, mut nodes) in domains {
        if nodes.len() < gang.pods as usize {
            continue;
        }
        // Tightest nodes first.
        nodes.sort_by(|a, b| a.free_gpus.cmp(&b.free_gpus).then(a.name.cmp(&b.name)));
        let chosen: Vec<String> = nodes
            .iter()
            .take(gang.pods as usize)
            .map(|n| n.name.clone())
            .collect();
        let domain_free: u64 = nodes.iter().map(|n| u64::from(n.free_gpus)).sum();
        let left = domain_free - u64::from(gang.gpus_per_pod) * u64::from(gang.pods);
        if best.as_ref().is_none_or(|(b, _)| left < *b) {
            best = Some((
                left,
                Placement {
                    nodes: chosen,
                    domain: level.map(|i| (levels.levels()[i].name.clone(), value.to_string())),
                },
            ));
        }
    }
    best.map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// zones z0,z1 × racks r0,r1 × hosts h0..h3, 8 GPUs each.
    fn cluster() -> ClusterView {
        let mut nodes = Vec::new();
        for z in 0..2 {
            for r in 0..2 {
                for h in 0..4 {
                    let name = format!("z{z}-r{r}-h{h}");
                    nodes.push(node(&name, &format!("z{z}"), &format!("z{z}-r{r}"), 8));
                }
            }
        }
        ClusterView::new(nodes)
    }

    fn node(name: &str, zone: &str, rack: &str, gpus: u32) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: [
                ("topology.kubernetes.io/zone", zone),
                ("topology.dynamo.nvidia.com/rack", rack),
                ("kubernetes.io/hostname", name),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            free_gpus: gpus,
            free_pods: 110,
            taints: Vec::new(),
        }
    }

    fn gang(pods: u32, gpus: u32, level: &str) -> GangRequest {
        let levels = TopologyLevels::default();
        GangRequest {
            pods,
            gpus_per_pod: gpus,
            pack_domain: levels
                .index_of(level)
                .map_or(PackDomain::Tightest, PackDomain::Level),
            tolerations: Vec::new(),
            node_constraints: NodeConstraints::default(),
        }
    }

    fn rack_of(node: &str) -> &str {
        &node[..5]
    }

    #[test]
    fn default_levels_parse() {
        assert_eq!(
            TopologyLevels::default().names(),
            vec!["zone", "rack", "host"]
        );
        assert!(TopologyLevels::parse("rack").is_err());
        assert!(TopologyLevels::parse("a=x,a=y").is_err());
    }

    #[test]
    fn multinode_gang_lands_in_one_rack_on_distinct_nodes() {
        let mut view = cluster();
        let p = view
            .place(&TopologyLevels::default(), &gang(2, 8, "rack"))
            .expect("fits");
        assert_eq!(p.nodes.len(), 2);
        assert_ne!(p.nodes[0], p.nodes[1]);
        assert_eq!(rack_of(&p.nodes[0]), rack_of(&p.nodes[1]));
        assert_eq!(p.domain.as_ref().map(|d| d.0.as_str()), Some("rack"));
        // Capacity is reserved: those nodes are full now.
        assert_eq!(view.node(&p.nodes[0]).map(|n| n.free_gpus), Some(0));
    }

    #[test]
    fn best_fit_prefers_the_fullest_rack_that_still_fits() {
        let mut view = cluster();
        let levels = TopologyLevels::default();
        // Fill two hosts of rack z1-r1, so it has 16 free GPUs, the least of all racks.
        view.reserve("z1-r1-h0", 8);
        view.reserve("z1-r1-h1", 8);
        let p = view.place(&levels, &gang(2, 8, "rack")).expect("fits");
        assert!(p.nodes.iter().all(|n| rack_of(n) == "z1-r1"), "{p:?}");
    }

    #[test]
    fn gang_stays_unplaced_when_no_rack_fits_and_says_why() {
        let view = cluster();
        // 5 pods × 8 GPUs: a rack has only 4 hosts.
        let err = view
            .find(&TopologyLevels::default(), &gang(5, 8, "rack"))
            .expect_err("no rack has 5 hosts");
        assert_eq!(err.gpus_needed, 40);
        assert_eq!(err.level.as_deref(), Some("rack"));
        assert_eq!(err.largest_free_domain.as_ref().map(|d| d.1), Some(32));
        let msg = err.to_string();
        assert_eq!(
            msg,
            "needs 5 nodes with 8 free GPUs each (40 GPUs) inside one rack, and none has that free; \
             the rack with the most free GPUs is z0-r0 with 32"
        );
    }

    #[test]
    fn gang_fits_after_a_node_is_added_to_a_rack() {
        let mut nodes: Vec<NodeInfo> = Vec::new();
        for h in 0..4 {
            nodes.push(node(&format!("z0-r0-h{h}"), "z0", "z0-r0", 8));
        }
        let levels = TopologyLevels::default();
        assert!(
            ClusterView::new(nodes.clone())
                .find(&levels, &gang(5, 8, "rack"))
                .is_err()
        );
        nodes.push(node("z0-r0-h4", "z0", "z0-r0", 8));
        let p = ClusterView::new(nodes)
            .find(&levels, &gang(5, 8, "rack"))
            .expect("fits now");
        assert_eq!(p.nodes.len(), 5);
    }

    #[test]
    fn several_gangs_do_not_double_book_a_node() {
        let mut view = cluster();
        let levels = TopologyLevels::default();
        let mut used = std::collections::BTreeSet::new();
        for _ in 0..16 {
            let p = view.place(&levels, &gang(1, 8, "host")).expect("16 hosts");
            assert!(used.insert(p.nodes[0].clone()), "node reused: {p:?}");
        }
        assert!(view.find(&levels, &gang(1, 8, "host")).is_err());
        // Zero-GPU pods still fit.
        assert!(view.find(&levels, &gang(1, 0, "host")).is_ok());
    }

    #[test]
    fn without_pack_domain_a_gang_packs_as_tight_as_it_can() {
        let mut view = cluster();
        let levels = TopologyLevels::default();
        // Leave one free host per rack: no rack holds a 2-pod gang, but a zone does.
        for z in 0..2 {
            for r in 0..2 {
                for h in 0..3 {
                    view.reserve(&format!("z{z}-r{r}-h{h}"), 8);
                }
            }
        }
        let p = view.find(&levels, &gang(2, 8, "")).expect("fits in a zone");
        assert_eq!(p.domain.as_ref().map(|d| d.0.as_str()), Some("zone"));
        assert_eq!(&p.nodes[0][..2], &p.nodes[1][..2]);
    }

    #[test]
    fn tainted_nodes_are_used_only_by_gangs_that_tolerate_them() {
        let mut n = node("a", "z0", "r0", 8);
        n.taints.push(Taint {
            key: "kwok.x-k8s.io/node".into(),
            value: "fake".into(),
            effect: "NoSchedule".into(),
        });
        let view = ClusterView::new([n]);
        let levels = TopologyLevels::default();
        let mut g = gang(1, 1, "host");
        assert!(view.find(&levels, &g).is_err());
        g.tolerations.push(Toleration {
            key: "kwok.x-k8s.io/node".into(),
            operator: "Exists".into(),
            ..Default::default()
        });
        assert!(view.find(&levels, &g).is_ok());
    }

    fn req(key: &str, operator: &str, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn labelled(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
        let mut n = node(name, "z0", "z0-r0", 8);
        for (k, v) in labels {
            n.labels.insert(k.to_string(), v.to_string());
        }
        n
    }

    /// The names of the nodes a one-pod gang with these constraints may take.
    fn allowed(nodes: &[NodeInfo], constraints: &NodeConstraints) -> Vec<String> {
        nodes
            .iter()
            .filter(|n| constraints.allows(n))
            .map(|n| n.name.clone())
            .collect()
    }

    fn affinity(terms: Vec<Vec<Requirement>>) -> NodeConstraints {
        NodeConstraints {
            required_terms: Some(
                terms
                    .into_iter()
                    .map(|match_expressions| NodeTerm {
                        match_expressions,
                        match_fields: Vec::new(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn node_selector_keeps_a_gang_off_nodes_without_its_labels() {
        let nodes = [
            labelled("a", &[("gpu", "h100")]),
            labelled("b", &[("gpu", "a100")]),
            labelled("c", &[("gpu", "h100"), ("pool", "batch")]),
            labelled("d", &[]),
        ];
        let view = ClusterView::new(nodes.clone());
        let levels = TopologyLevels::default();
        let mut g = gang(2, 8, "");
        g.node_constraints.node_selector = BTreeMap::from([("gpu".into(), "h100".into())]);
        let p = view.find(&levels, &g).expect("a and c carry gpu=h100");
        assert_eq!(p.nodes, ["a", "c"]);
        // Every label must match.
        g.node_constraints
            .node_selector
            .insert("pool".into(), "batch".into());
        assert_eq!(allowed(&nodes, &g.node_constraints), ["c"]);
        assert!(view.find(&levels, &g).is_err(), "one node for two pods");
        g.pods = 1;
        let p = view.find(&levels, &g).expect("fits on c");
        assert_eq!(p.nodes, ["c"]);
    }

    #[test]
    fn required_node_affinity_operators() {
        let nodes = [
            labelled("a", &[("gpu", "h100"), ("gpus", "8")]),
            labelled("b", &[("gpu", "a100"), ("gpus", "4")]),
            labelled("c", &[("gpus", "x")]),
        ];
        let one = |r: Requirement| allowed(&nodes, &affinity(vec![vec![r]]));
        assert_eq!(one(req("gpu", "In", &["h100", "b200"])), ["a"]);
        assert_eq!(one(req("gpu", "NotIn", &["h100"])), ["b", "c"]);
        assert_eq!(one(req("gpu", "Exists", &[])), ["a", "b"]);
        assert_eq!(one(req("gpu", "DoesNotExist", &[])), ["c"]);
        assert_eq!(one(req("gpus", "Gt", &["4"])), ["a"]);
        assert_eq!(one(req("gpus", "Lt", &["8"])), ["b"]);
        // Malformed requirements match nothing, as in the scheduler.
        assert!(one(req("gpus", "Gt", &["four"])).is_empty());
        assert!(one(req("gpu", "In", &[])).is_empty());
        assert!(one(req("gpu", "Exists", &["h100"])).is_empty());
        assert!(one(req("gpu", "Like", &["h100"])).is_empty());
        // Requirements of a term are ANDed, terms ORed.
        let and = affinity(vec![vec![
            req("gpu", "Exists", &[]),
            req("gpus", "Lt", &["8"]),
        ]]);
        assert_eq!(allowed(&nodes, &and), ["b"]);
        let or = affinity(vec![
            vec![req("gpu", "In", &["h100"])],
            vec![req("gpu", "DoesNotExist", &[])],
        ]);
        assert_eq!(allowed(&nodes, &or), ["a", "c"]);
        // An empty term matches no node.
        assert!(allowed(&nodes, &affinity(vec![Vec::new()])).is_empty());
        // matchFields on metadata.name, together with the nodeSelector.
        let mut by_name = affinity(Vec::new());
        by_name.required_terms = Some(vec![NodeTerm {
            match_expressions: Vec::new(),
            match_fields: vec![req("metadata.name", "In", &["a", "b"])],
        }]);
        assert_eq!(allowed(&nodes, &by_name), ["a", "b"]);
        by_name.node_selector = BTreeMap::from([("gpus".into(), "4".into())]);
        assert_eq!(allowed(&nodes, &by_name), ["b"]);
    }

    #[test]
    fn a_gang_no_node_allows_stays_unplaced_and_names_the_selector() {
        let levels = TopologyLevels::default();
        let mut view = cluster();
        let mut g = gang(2, 8, "rack");
        g.node_constraints.node_selector = BTreeMap::from([("gpu".into(), "h100".into())]);
        let err = view
            .place(&levels, &g)
            .expect_err("no node carries gpu=h100");
        assert_eq!((err.ready_nodes, err.excluded_by_pod), (16, 16));
        assert_eq!(
            err.to_string(),
            "needs 2 nodes with 8 free GPUs each (16 GPUs) inside one rack, and none has that free; \
             the pod's nodeSelector/affinity matches no ready node"
        );
        assert_eq!(view.node("z0-r0-h0").map(|n| n.free_gpus), Some(8));

        // Only rack z1-r1 is allowed, and it has one free host left.
        for h in 0..3 {
            view.reserve(&format!("z1-r1-h{h}"), 8);
        }
        g.node_constraints = affinity(vec![vec![req(
            "topology.dynamo.nvidia.com/rack",
            "In",
            &["z1-r1"],
        )]]);
        let err = view.find(&levels, &g).expect_err("one free host");
        assert_eq!(
            err.to_string(),
            "needs 2 nodes with 8 free GPUs each (16 GPUs) inside one rack, and none has that free; \
             the pod's nodeSelector/affinity rules out 12 of 16 ready nodes; among the rest, \
             the rack with the most free GPUs is z1-r1 with 8"
        );
    }
}
