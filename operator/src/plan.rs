//! Desired state against observed pods: which gangs to create, place, un-gate or delete, and
//! what the status says. Pure: the controller turns the API server's objects into [`PodObs`]
//! and [`ServiceDesired`], and carries out the [`Action`]s.
//!
//! Rules:
//! - gangs `0..replicas` should exist with every rank; gangs at or above `replicas` are removed
//!   (scale-down removes the highest gang indices);
//! - a gang is placed only once all its pods exist, still gated and unpinned; it is un-gated once
//!   every pod is pinned; a gang that lost a pod after un-gating, has a failed pod, is half pinned
//!   (a crash between pin patches) or stayed half bound past the deadline is deleted whole and
//!   made again;
//! - a gang whose pods run an older template is replaced: at once when it is not ready anyway,
//!   otherwise one gang at a time and only while every wanted gang is ready and has been for
//!   `min_ready_secs` (so routers have admitted it), so the service never drops below
//!   `replicas - 1` ready gangs.

use std::collections::{BTreeMap, BTreeSet};

/// One pod as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodObs {
    pub service: String,
    pub gang: u32,
    pub rank: u32,
    pub hash: String,
    /// Still carries our scheduling gate.
    pub gated: bool,
    /// Pinned to a node by placement.
    pub pinned: bool,
    /// Bound by the scheduler (`spec.nodeName` set).
    pub bound: bool,
    pub ready: bool,
    /// Unix seconds when it last turned Ready (`None`: unknown, counts as long ago).
    pub ready_since: Option<i64>,
    pub failed: bool,
    pub terminating: bool,
    /// Unix seconds when its gate was lifted.
    pub ungated_at: Option<i64>,
}

/// What one service should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDesired {
    pub name: String,
    pub replicas: u32,
    pub node_count: u32,
    pub hash: String,
    /// A rolling update replaces the next gang only once every wanted gang has been ready this long.
    pub min_ready_secs: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeleteReason {
    ScaledDown,
    ServiceRemoved,
    /// A pod of an un-gated gang is gone or failed.
    Broken,
    /// Some pods pinned, some not (a restart between pin patches).
    HalfPinned,
    /// Some pods bound and some not, past the deadline.
    PartialBindTimeout,
    /// Replaced by the current pod template.
    Rollout,
}

impl DeleteReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeleteReason::ScaledDown => "ScaledDown",
            DeleteReason::ServiceRemoved => "ServiceRemoved",
            DeleteReason::Broken => "GangBroken",
            DeleteReason::HalfPinned => "GangHalfPinned",
            DeleteReason::PartialBindTimeout => "GangPartiallyBound",
            DeleteReason::Rollout => "RollingUpdate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Delete every pod of the gang.
    DeleteGang {
        service: String,
        gang: u32,
        reason: DeleteReason,
    },
    /// Create the missing ranks of a gang.
    Create {
        service: String,
        gang: u32,
        ranks: Vec<u32>,
    },
    /// All pods exist, gated and unpinned: find a domain and pin them.
    Place { service: String, gang: u32 },
    /// All pods pinned: lift the gates still present.
    Ungate { service: String, gang: u32 },
}

/// Gang counts for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceCounts {
    pub replicas: u32,
    pub ready: u32,
    pub updated: u32,
    /// Gangs with at least one pod (what the scaling adapter reports as current).
    pub existing: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub counts: BTreeMap<String, ServiceCounts>,
    /// Seconds until a partially bound gang reaches the deadline (for requeueing).
    pub recheck_in: Option<i64>,
}

/// Computes the actions for one graph.
pub fn plan(desired: &[ServiceDesired], pods: &[PodObs], now: i64, deadline_secs: i64) -> Plan {
    let mut out = Plan::default();
    let mut by_service: BTreeMap<&str, BTreeMap<u32, Vec<&PodObs>>> = BTreeMap::new();
    for p in pods {
        by_service
            .entry(p.service.as_str())
            .or_default()
            .entry(p.gang)
            .or_default()
            .push(p);
    }
    let wanted: BTreeSet<&str> = desired.iter().map(|d| d.name.as_str()).collect();
    for (service, gangs) in &by_service {
        if !wanted.contains(service) {
            for (gang, gpods) in gangs.iter().rev() {
                if gpods.iter().any(|p| !p.terminating) {
                    out.actions.push(Action::DeleteGang {
                        service: service.to_string(),
                        gang: *gang,
                        reason: DeleteReason::ServiceRemoved,
                    });
                }
            }
        }
    }
    let empty = BTreeMap::new();
    for d in desired {
        let gangs = by_service.get(d.name.as_str()).unwrap_or(&empty);
        plan_service(d, gangs, now, deadline_secs, &mut out);
    }
    out
}

fn plan_service(
    d: &ServiceDesired,
    gangs: &BTreeMap<u32, Vec<&PodObs>>,
    now: i64,
    deadline_secs: i64,
    out: &mut Plan,
) {
    let del = |gang: u32, reason| Action::DeleteGang {
        service: d.name.clone(),
        gang,
        reason,
    };
    let mut counts = ServiceCounts {
        replicas: d.replicas,
        existing: gangs.len() as u32,
        ..Default::default()
    };
    // Scale-down: highest gang first.
    for (gang, gpods) in gangs.iter().rev() {
        if *gang >= d.replicas && gpods.iter().any(|p| !p.terminating) {
            out.actions.push(del(*gang, DeleteReason::ScaledDown));
        }
    }
    let mut stale_ready: Vec<u32> = Vec::new();
    let mut busy = 0u32; // wanted gangs not ready (down or on their way)
    let mut settling: Option<i64> = None; // seconds until the latest ready gang counts as available
    for gang in 0..d.replicas {
        let gpods: &[&PodObs] = gangs.get(&gang).map_or(&[], Vec::as_slice);
        let complete = (0..d.node_count).all(|r| gpods.iter().any(|p| p.rank == r));
        let ready = complete
            && gpods.len() as u32 == d.node_count
            && gpods.iter().all(|p| p.ready && !p.terminating);
        let current = gpods.iter().all(|p| p.hash == d.hash);
        if ready {
            counts.ready += 1;
            let since = gpods.iter().filter_map(|p| p.ready_since).max();
            let left = since.map_or(0, |t| t + d.min_ready_secs - now);
            if left > 0 {
                settling = Some(settling.map_or(left, |s| s.max(left)));
            }
        } else {
            busy += 1;
        }
        if complete && current && !gpods.iter().any(|p| p.terminating) {
            counts.updated += 1;
        }
        if gpods.iter().any(|p| p.terminating) {
            continue; // wait for the old pods to go before making new ones with the same names
        }
        let extra_ranks = gpods.iter().any(|p| p.rank >= d.node_count);
        if !current || extra_ranks {
            if ready {
                stale_ready.push(gang);
            } else {
                out.actions.push(del(gang, DeleteReason::Rollout));
            }
            continue;
        }
        let all_gated = gpods.iter().all(|p| p.gated);
        if gpods.iter().any(|p| p.failed) || (!complete && !all_gated) {
            out.actions.push(del(gang, DeleteReason::Broken));
            continue;
        }
        if !complete {
            let ranks = (0..d.node_count)
                .filter(|r| !gpods.iter().any(|p| p.rank == *r))
                .collect();
            out.actions.push(Action::Create {
                service: d.name.clone(),
                gang,
                ranks,
            });
            continue;
        }
        let pinned = gpods.iter().filter(|p| p.pinned).count();
        let gated = gpods.iter().filter(|p| p.gated).count();
        if gated > 0 {
            if pinned == 0 && gated == gpods.len() {
                out.actions.push(Action::Place {
                    service: d.name.clone(),
                    gang,
                });
            } else if pinned == gpods.len() {
                out.actions.push(Action::Ungate {
                    service: d.name.clone(),
                    gang,
                });
            } else {
                out.actions.push(del(gang, DeleteReason::HalfPinned));
            }
            continue;
        }
        let bound = gpods.iter().filter(|p| p.bound).count();
        if bound < gpods.len() {
            let since = gpods
                .iter()
                .filter_map(|p| p.ungated_at)
                .min()
                .unwrap_or(now);
            let left = since + deadline_secs - now;
            if bound > 0 && left <= 0 {
                out.actions
                    .push(del(gang, DeleteReason::PartialBindTimeout));
            } else {
                out.recheck_in = Some(out.recheck_in.map_or(left.max(1), |r| r.min(left.max(1))));
            }
        }
    }
    // Roll ready gangs one at a time, only while every wanted gang is ready, and has been for
    // min_ready_secs (else look again when it will have been).
    if busy == 0
        && let Some(gang) = stale_ready.first()
    {
        match settling {
            Some(left) => {
                out.recheck_in = Some(out.recheck_in.map_or(left, |r| r.min(left)));
            }
            None => out.actions.push(del(*gang, DeleteReason::Rollout)),
        }
    }
    out.counts.insert(d.name.clone(), counts);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(replicas: u32, node_count: u32, hash: &str) -> ServiceDesired {
        ServiceDesired {
            name: "W".into(),
            replicas,
            node_count,
            hash: hash.into(),
            min_ready_secs: 5,
        }
    }

    fn running(gang: u32, rank: u32, hash: &str) -> PodObs {
        PodObs {
            service: "W".into(),
            gang,
            rank,
            hash: hash.into(),
            pinned: true,
            bound: true,
            ready: true,
            ..Default::default()
        }
    }

    fn gated(gang: u32, rank: u32) -> PodObs {
        PodObs {
            service: "W".into(),
            gang,
            rank,
            hash: "h".into(),
            gated: true,
            ..Default::default()
        }
    }

    fn deletes(p: &Plan) -> Vec<(u32, DeleteReason)> {
        p.actions
            .iter()
            .filter_map(|a| match a {
                Action::DeleteGang { gang, reason, .. } => Some((*gang, *reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn empty_service_creates_every_rank_of_every_gang() {
        let p = plan(&[svc(2, 2, "h")], &[], 0, 300);
        assert_eq!(
            p.actions,
            vec![
                Action::Create {
                    service: "W".into(),
                    gang: 0,
                    ranks: vec![0, 1]
                },
                Action::Create {
                    service: "W".into(),
                    gang: 1,
                    ranks: vec![0, 1]
                },
            ]
        );
    }

    #[test]
    fn complete_gated_gang_is_placed_then_ungated() {
        let pods = vec![gated(0, 0), gated(0, 1)];
        let p = plan(&[svc(1, 2, "h")], &pods, 0, 300);
        assert_eq!(
            p.actions,
            vec![Action::Place {
                service: "W".into(),
                gang: 0
            }]
        );
        let pinned: Vec<PodObs> = pods
            .into_iter()
            .map(|mut x| {
                x.pinned = true;
                x
            })
            .collect();
        let p = plan(&[svc(1, 2, "h")], &pinned, 0, 300);
        assert_eq!(
            p.actions,
            vec![Action::Ungate {
                service: "W".into(),
                gang: 0
            }]
        );
    }

    #[test]
    fn half_pinned_gang_is_recreated() {
        let mut a = gated(0, 0);
        a.pinned = true;
        let p = plan(&[svc(1, 2, "h")], &[a, gated(0, 1)], 0, 300);
        assert_eq!(deletes(&p), vec![(0, DeleteReason::HalfPinned)]);
    }

    #[test]
    fn scale_down_removes_highest_gangs_first() {
        let pods: Vec<PodObs> = (0..4).map(|g| running(g, 0, "h")).collect();
        let p = plan(&[svc(2, 1, "h")], &pods, 0, 300);
        assert_eq!(
            deletes(&p),
            vec![(3, DeleteReason::ScaledDown), (2, DeleteReason::ScaledDown)]
        );
        assert_eq!(p.counts["W"].existing, 4);
        assert_eq!(p.counts["W"].ready, 2);
    }

    #[test]
    fn partially_bound_gang_is_deleted_only_after_the_deadline() {
        let mut a = running(0, 0, "h");
        a.ungated_at = Some(100);
        let mut b = a.clone();
        b.rank = 1;
        b.bound = false;
        b.ready = false;
        let pods = vec![a, b];
        let early = plan(&[svc(1, 2, "h")], &pods, 200, 300);
        assert!(deletes(&early).is_empty());
        assert_eq!(early.recheck_in, Some(200));
        let late = plan(&[svc(1, 2, "h")], &pods, 400, 300);
        assert_eq!(deletes(&late), vec![(0, DeleteReason::PartialBindTimeout)]);
    }

    #[test]
    fn rolling_update_replaces_one_ready_gang_at_a_time() {
        let pods: Vec<PodObs> = (0..3).map(|g| running(g, 0, "old")).collect();
        let p = plan(&[svc(3, 1, "new")], &pods, 0, 300);
        assert_eq!(deletes(&p), vec![(0, DeleteReason::Rollout)]);
        assert_eq!(p.counts["W"].updated, 0);
    }

    #[test]
    fn rolling_update_waits_while_a_gang_is_down() {
        // Gang 0 is already new but not ready yet: no other ready gang may go.
        let mut g0 = running(0, 0, "new");
        g0.ready = false;
        let pods = vec![g0, running(1, 0, "old"), running(2, 0, "old")];
        let p = plan(&[svc(3, 1, "new")], &pods, 0, 300);
        assert!(deletes(&p).is_empty(), "{p:?}");
        assert_eq!(p.counts["W"].ready, 2);
        assert_eq!(p.counts["W"].updated, 1);
    }

    #[test]
    fn rolling_update_waits_until_the_new_gang_has_been_ready_for_min_ready() {
        // Gang 0 (new) turned Ready at t=100: gang 1 (old) goes only from t=105, and the plan asks
        // to be looked at again when that is.
        let mut g0 = running(0, 0, "new");
        g0.ready_since = Some(100);
        let mut g1 = running(1, 0, "old");
        g1.ready_since = Some(10);
        let pods = vec![g0, g1];
        let early = plan(&[svc(2, 1, "new")], &pods, 102, 300);
        assert!(deletes(&early).is_empty(), "{early:?}");
        assert_eq!(early.recheck_in, Some(3));
        assert_eq!(early.counts["W"].ready, 2);
        let late = plan(&[svc(2, 1, "new")], &pods, 105, 300);
        assert_eq!(deletes(&late), vec![(1, DeleteReason::Rollout)]);
    }

    #[test]
    fn stale_gangs_that_are_not_ready_are_replaced_at_once() {
        let pods = vec![gated(0, 0), gated(1, 0)];
        let p = plan(&[svc(2, 1, "new")], &pods, 0, 300);
        assert_eq!(
            deletes(&p),
            vec![(0, DeleteReason::Rollout), (1, DeleteReason::Rollout)]
        );
    }

    #[test]
    fn gang_that_lost_a_pod_after_ungating_is_recreated_whole() {
        let p = plan(&[svc(1, 2, "h")], &[running(0, 0, "h")], 0, 300);
        assert_eq!(deletes(&p), vec![(0, DeleteReason::Broken)]);
    }

    #[test]
    fn terminating_gang_is_left_alone_until_it_is_gone() {
        let mut a = running(0, 0, "h");
        a.terminating = true;
        let p = plan(&[svc(1, 1, "h")], &[a], 0, 300);
        assert!(p.actions.is_empty());
    }

    #[test]
    fn pods_of_removed_services_are_deleted() {
        let mut a = running(0, 0, "h");
        a.service = "Gone".into();
        let p = plan(&[svc(0, 1, "h")], &[a], 0, 300);
        assert_eq!(
            p.actions,
            vec![Action::DeleteGang {
                service: "Gone".into(),
                gang: 0,
                reason: DeleteReason::ServiceRemoved
            }]
        );
    }
}
