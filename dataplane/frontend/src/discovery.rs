//! Where the frontend's workers come from. One trait, [`Discovery`], yields the current set of
//! candidate gRPC URLs each time it changes; the [`WorkerPool`] probes candidates and admits those
//! that answer. Three sources:
//!
//! - [`Static`]: a fixed `--worker` list;
//! - [`Serve`]: the set `dynamo serve` maintains as it starts, restarts, adds and removes worker
//!   processes, sent as JSON lines on the frontend's stdin (`{"workers": ["http://..", ...]}`);
//! - [`kube::Kubernetes`]: the EndpointSlices of the graph's worker Services, Ready endpoints only.
//!
//! A source only nominates; membership (a worker answering its `Info`) is the pool's.

pub mod kube;

use std::collections::BTreeSet;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio_util::sync::CancellationToken;

use crate::pool::WorkerPool;

/// How the frontend finds its workers (`dynamo frontend --discovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryMode {
    /// The `--worker` URLs, fixed for the process's life.
    Static,
    /// Worker sets sent by `dynamo serve` on stdin; stdin closing stops the frontend.
    Serve,
    /// The Ready endpoints of the graph's worker Services (EndpointSlices), watched in the
    /// frontend's namespace.
    Kubernetes,
}

/// Why a discovery source stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("could not read worker sets from stdin")]
    ReadStdin(#[source] std::io::Error),
    #[error(
        "a worker set on stdin is not valid JSON ({line:?}); expected {{\"workers\": [\"http://HOST:PORT\", ...]}}"
    )]
    ParseLine {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not connect to the Kubernetes API (in-cluster config or KUBECONFIG)")]
    KubeClient(#[source] ::kube::Error),
    #[error("watching EndpointSlices in namespace {namespace:?} with selector {selector:?} failed")]
    KubeWatch {
        namespace: String,
        selector: String,
        #[source]
        source: ::kube::runtime::watcher::Error,
    },
}

/// A source of candidate worker URLs.
pub trait Discovery: Send {
    /// The next candidate set, once it differs from the last one; `None` when the source has no
    /// more to say (the pool keeps the last set).
    fn next(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<BTreeSet<String>>, DiscoveryError>> + Send;
}

/// Feeds `source` into `pool` until it ends or `shutdown`. Returns how the source ended.
pub async fn run<D: Discovery>(
    mut source: D,
    pool: std::sync::Arc<WorkerPool>,
    shutdown: CancellationToken,
) -> Result<(), DiscoveryError> {
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = source.next() => next?,
        };
        match next {
            Some(urls) => pool.set_candidates(&urls).await,
            None => return Ok(()),
        }
    }
}

// === Static ===

/// A fixed list: yields it once.
pub struct Static {
    urls: Option<BTreeSet<String>>,
}

impl Static {
    pub fn new(urls: impl IntoIterator<Item = String>) -> Static {
        Static {
            urls: Some(urls.into_iter().collect()),
        }
    }
}

impl Discovery for Static {
    async fn next(&mut self) -> Result<Option<BTreeSet<String>>, DiscoveryError> {
        Ok(self.urls.take())
    }
}

// === Serve ===

/// JSON lines from `dynamo serve`: each a whole worker set. Ends at end-of-file.
pub struct Serve<R> {
    lines: tokio::io::Lines<R>,
}

/// One line of the `serve` protocol.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct WorkerSet {
    pub workers: Vec<String>,
}

impl<R: AsyncBufRead + Unpin> Serve<R> {
    pub fn new(input: R) -> Serve<R> {
        Serve {
            lines: input.lines(),
        }
    }
}

impl Serve<tokio::io::BufReader<tokio::io::Stdin>> {
    /// Reads the process's stdin.
    pub fn stdin() -> Self {
        Serve::new(tokio::io::BufReader::new(tokio::io::stdin()))
    }
}

impl<R: AsyncBufRead + Unpin + Send> Discovery for Serve<R> {
    async fn next(&mut self) -> Result<Option<BTreeSet<String>>, DiscoveryError> {
        loop {
            let Some(line) = self
                .lines
                .next_line()
                .await
                .map_err(DiscoveryError::ReadStdin)?
            else {
                return Ok(None);
            };
            if line.trim().is_empty() {
                continue;
            }
            let set: WorkerSet =
                serde_json::from_str(&line).map_err(|source| DiscoveryError::ParseLine {
                    line: line.clone(),
                    source,
                })?;
            return Ok(Some(set.workers.into_iter().collect()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serve_lines_are_whole_worker_sets_and_eof_ends_the_source() {
        let input =
            b"{\"workers\":[\"http://a:1\",\"http://b:2\"]}\n\n{\"workers\":[\"http://b:2\"]}\n";
        let mut s = Serve::new(&input[..]);
        let first = s.next().await.expect("valid").expect("a set");
        assert_eq!(first.len(), 2);
        let second = s.next().await.expect("valid").expect("a set");
        assert_eq!(second.into_iter().collect::<Vec<_>>(), ["http://b:2"]);
        assert!(s.next().await.expect("eof is fine").is_none());
    }

    #[tokio::test]
    async fn a_bad_serve_line_names_the_expected_shape() {
        let mut s = Serve::new(&b"[1,2]\n"[..]);
        let error = s.next().await.expect_err("not a worker set").to_string();
        assert!(error.contains("{\"workers\""), "{error}");
    }

    #[tokio::test]
    async fn static_yields_its_list_once() {
        let mut s = Static::new(["http://a:1".to_string()]);
        assert_eq!(s.next().await.expect("ok").map(|s| s.len()), Some(1));
        assert!(s.next().await.expect("ok").is_none());
    }
}
