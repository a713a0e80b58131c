//! Following one member's KV events into the `kv` policy's index.
//!
//! The follower subscribes to the worker's numbered event stream asking for a snapshot when its
//! view cannot be resumed (the first time, and after a gap older than the sidecar's ring);
//! otherwise a broken stream resumes after the last sequence number seen and the sidecar replays
//! what was missed. A member is one instance of a worker ([`WorkerId`]): a restart makes a new
//! member with its own follower, so this one only ever sees one instance's events. It stops when
//! the membership ends (the pool cancels `stop` and removes the worker from the index).

use std::{sync::Arc, time::Duration};

use dynamo_kv::{KvEvent, WorkerId, policy::KvRouter};
use dynamo_protocol::proto::{self, worker_client::WorkerClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Applies `worker`'s KV events to `router` until `stop`.
pub async fn follow(
    router: Arc<KvRouter>,
    worker: WorkerId,
    client: WorkerClient<Channel>,
    stop: CancellationToken,
) {
    let mut after = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut c = client.clone();
        let request = proto::SubscribeKvEventsRequest {
            after_seq: after,
            snapshot: true,
        };
        let subscribed = tokio::select! {
            () = stop.cancelled() => return,
            r = c.subscribe_kv_events(request) => r,
        };
        match subscribed {
            Ok(response) => {
                backoff = Duration::from_millis(100);
                let mut stream = response.into_inner();
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match next {
                        Ok(Some(batch)) => {
                            if batch.instance != worker {
                                // Another instance answers at this address: the pool's probe
                                // will make it a member of its own.
                                tracing::debug!(
                                    worker,
                                    "event stream of another instance; stopping"
                                );
                                return;
                            }
                            apply_batch(&router, worker, &mut after, batch);
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(worker, %status, "KV event stream broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(worker, %status, "could not subscribe to KV events"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn apply_batch(router: &KvRouter, worker: WorkerId, after: &mut u64, batch: proto::KvEventBatch) {
    if batch.snapshot {
        // A snapshot replaces the worker's view.
        let _ = router.apply(worker, KvEvent::Cleared);
        *after = batch.snapshot_seq;
    }
    router.set_block_size(batch.block_size);
    for event in batch.events {
        *after = (*after).max(event.seq);
        if let Some(e) = event.into_event()
            && let Err(error) = router.apply(worker, e)
        {
            tracing::debug!(worker, %error, "KV event not applied");
        }
    }
}
