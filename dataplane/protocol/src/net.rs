//! Serving an axum router (HTTP/1.1 and HTTP/2, so gRPC too) on our own accept loop.
//!
//! Why not `axum::serve`: we want `TCP_NODELAY` on every accepted socket (a streamed response must not
//! wait on Nagle + the client's delayed ACK), HTTP/2 prior knowledge for tonic clients on the same port,
//! and a drain with a deadline. This module owns exactly that and nothing about what is served.

use std::{io, net::SocketAddr, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds `addr` (port 0 = any free port) and returns the listener with its real address.
pub async fn bind(addr: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Accepts connections until `stop_accepting` is cancelled, then waits for open connections to finish
/// for at most `drain` before returning (remaining connections are dropped).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    stop_accepting: CancellationToken,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(4096);
    loop {
        let (stream, _peer) = tokio::select! {
            () = stop_accepting.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("all connections drained"),
        () = tokio::time::sleep(drain) => tracing::warn!(?drain, "drain deadline passed; closing remaining connections"),
    }
}

/// Resolves on SIGINT or SIGTERM, or when `stdin` reaches end-of-file if `watch_stdin` is set.
///
/// `dynamo serve` starts its children with a pipe on stdin and closes it to ask them to stop: a child
/// therefore also stops when its parent dies, whatever killed it, and never lingers as an orphan.
pub async fn shutdown_signal(watch_stdin: bool) -> &'static str {
    {
        let stdin_eof = async {
            if watch_stdin {
                use tokio::io::AsyncReadExt;
                let mut stdin = tokio::io::stdin();
                let mut buf = [0u8; 64];
                loop {
                    match stdin.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            } else {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            () = term => "SIGTERM",
            () = stdin_eof => "stdin closed",
        }
    }
}
