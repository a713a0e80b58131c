//! Routing policies: pure functions and state that pick a worker for a request, with no I/O.
//!
//! - [`load`]: round-robin, random, least-loaded and power-of-two over requests in flight, and
//!   [`RouterMode`], the name of every policy;
//! - [`kv`]: the KV-cache-aware policy (prefix overlap from the index against load), with its
//!   approximate mode for engines that publish no events.
//!
//! The frontend owns the workers (membership, connections, liveness) and hands each decision its
//! candidates by [`crate::WorkerId`].

pub mod kv;
pub mod load;

pub use kv::{KvChoice, KvClaim, KvRouter, KvRouterConfig};
pub use load::{RouterMode, select};
