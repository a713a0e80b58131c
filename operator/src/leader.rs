//! Leader election on a `coordination.k8s.io/v1` Lease, so that only one operator replica
//! reconciles. kube-runtime 5 ships none, so this is the usual small protocol:
//!
//! - acquire: take the Lease when it has no holder, is ours, or its holder has not renewed within
//!   `leaseDurationSeconds`; every write carries the `resourceVersion` read, so two candidates
//!   cannot both win (the loser gets 409 Conflict);
//! - renew every third of the duration; a leader that cannot renew before the Lease would expire
//!   stops leading (the caller exits so that it never reconciles next to a new leader);
//! - release on shutdown (clear the holder) so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// What a Lease says about who leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No holder, ours, or expired: we may write ourselves in.
    Take,
    /// Someone else holds a live lease.
    Wait,
}

/// Pure rule: may `identity` take or renew `spec` at `now`?
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Take;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => Decision::Take,
        Some(h) if h == identity => Decision::Take,
        Some(_) => {
            let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            match renewed {
                Some(t) if t + SignedDuration::from_secs(secs) > now => Decision::Wait,
                _ => Decision::Take,
            }
        }
    }
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// One attempt to take or renew the Lease; `Ok(true)` when we hold it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(15).max(1);
        let current = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                Err(e) => Err(e),
            };
        };
        if decide(lease.spec.as_ref(), &self.identity, now) == Decision::Wait {
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // `replace` sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until we lead (or `cancel` fires: then `false`).
    pub async fn acquire(&self, cancel: &CancellationToken) -> bool {
        let retry = self.duration / 3;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return true;
                }
                Ok(false) => tracing::debug!(lease = %self.name, "another operator leads; waiting"),
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "leader election failed; retrying")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Renews until `cancel` fires (returns `true`) or leadership is lost (returns `false`).
    pub async fn keep(&self, cancel: &CancellationToken) -> bool {
        let every = self.duration / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return true,
                () = tokio::time::sleep(every) => {}
            }
            match tokio::time::timeout(every, self.try_acquire()).await {
                Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.name, "lost the lease to another operator");
                    return false;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.name, error = %e, "lease renewal failed")
                }
                Err(_) => tracing::warn!(lease = %self.name, "lease renewal timed out"),
            }
            // Stop before the lease could expire under us.
            if last_ok.elapsed() + every >= self.duration {
                tracing::error!(lease = %self.name, "could not renew the lease in time");
                return false;
            }
        }
    }

    /// Gives the Lease up (best effort, bounded by one renew period).
    pub async fn release(&self) {
        let work = async {
            let mut lease = self.api.get_opt(&self.name).await?;
            if let Some(l) = lease.as_mut()
                && let Some(spec) = l.spec.as_mut()
                && spec.holder_identity.as_deref() == Some(&self.identity)
            {
                spec.holder_identity = None;
                spec.renew_time = None;
                spec.acquire_time = None;
                self.api
                    .replace(&self.name, &PostParams::default(), l)
                    .await?;
            }
            Ok::<_, kube::Error>(())
        };
        match tokio::time::timeout(self.duration / 3, work).await {
            Ok(Ok(())) => tracing::info!(lease = %self.name, "released the lease"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.name, error = %e, "could not release the lease")
            }
            Err(_) => tracing::warn!(lease = %self.name, "releasing the lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_holder_is_respected() {
        let now = Timestamp::now();
        assert_eq!(decide(Some(&spec("b", 5)), "a", now), Decision::Wait);
    }

    #[test]
    fn an_expired_empty_or_own_lease_is_taken() {
        let now = Timestamp::now();
        assert_eq!(decide(Some(&spec("b", 20)), "a", now), Decision::Take);
        assert_eq!(decide(Some(&spec("a", 5)), "a", now), Decision::Take);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", now),
            Decision::Take
        );
        assert_eq!(decide(None, "a", now), Decision::Take);
    }
}
