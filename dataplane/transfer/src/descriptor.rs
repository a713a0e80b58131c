//! Naming blocks across processes: [`PoolId`], [`Endpoint`], [`BlockSetDescriptor`], and the
//! [`PoolRegistry`] through which a serving side publishes its pools.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pool::BlockPool;

/// A pool as registered with one server. Random per registration, so a descriptor that outlives a
/// server restart names no pool rather than the wrong one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolId(pub u64);

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Where a pool is served from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum Endpoint {
    /// A [`crate::TcpServer`].
    Tcp { addr: SocketAddr },
    /// A [`crate::ShmServer`]'s Unix socket (same host only).
    Shm { socket: PathBuf },
}

impl Endpoint {
    /// The transport that reads from this endpoint.
    pub fn kind(&self) -> TransportKind {
        match self {
            Self::Tcp { .. } => TransportKind::Tcp,
            Self::Shm { .. } => TransportKind::Shm,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { addr } => write!(f, "tcp://{addr}"),
            Self::Shm { socket } => write!(f, "shm://{}", socket.display()),
        }
    }
}

/// The kinds of [`crate::KvTransport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    Tcp,
    Shm,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
        })
    }
}

/// "These blocks of that pool, served there": what a prefill worker hands the decode side (through
/// the frontend) so it can pull the KV cache. Serialisable; carries no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSetDescriptor {
    pub endpoint: Endpoint,
    pub pool: PoolId,
    /// Bytes per block in the source pool; the reader checks it against its own.
    pub block_bytes: u64,
    /// Source block indices, in transfer order.
    pub blocks: Vec<u32>,
}

impl BlockSetDescriptor {
    /// Total bytes the transfer moves.
    pub fn total_bytes(&self) -> u64 {
        self.block_bytes * self.blocks.len() as u64
    }
}

// === impl PoolRegistry ===

/// The pools a server serves, shared between the server task and the code that registers pools.
/// Cheap to clone.
#[derive(Clone)]
pub struct PoolRegistry {
    endpoint: Endpoint,
    require_shared: bool,
    pools: Arc<RwLock<HashMap<PoolId, Arc<BlockPool>>>>,
}

impl fmt::Debug for PoolRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolRegistry")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl PoolRegistry {
    pub(crate) fn new(endpoint: Endpoint, require_shared: bool) -> Self {
        Self {
            endpoint,
            require_shared,
            pools: Arc::default(),
        }
    }

    /// The endpoint descriptors from this registry point at.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Serves `pool` under a fresh random id.
    pub fn register(&self, pool: Arc<BlockPool>) -> Result<PoolId> {
        if self.require_shared && !pool.is_shared() {
            return Err(Error::PoolNotShareable);
        }
        let mut pools = self.pools.write().unwrap_or_else(PoisonError::into_inner);
        let id = loop {
            let id = PoolId(rand::random());
            if !pools.contains_key(&id) {
                break id;
            }
        };
        pools.insert(id, pool);
        Ok(id)
    }

    /// Stops serving `pool`; returns whether it was registered. Transfers already streaming finish.
    pub fn unregister(&self, pool: PoolId) -> bool {
        self.pools
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pool)
            .is_some()
    }

    /// The pool registered as `pool`.
    pub fn get(&self, pool: PoolId) -> Option<Arc<BlockPool>> {
        self.pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&pool)
            .cloned()
    }

    /// A descriptor for `blocks` of `pool`, checked against the pool's size.
    pub fn describe(&self, pool: PoolId, blocks: Vec<u32>) -> Result<BlockSetDescriptor> {
        let registered = self.get(pool).ok_or(Error::Refused {
            peer: self.endpoint.clone(),
            reason: crate::RemoteError::UnknownPool,
            block: None,
        })?;
        if let Some(&block) = blocks
            .iter()
            .find(|&&b| b as usize >= registered.num_blocks())
        {
            return Err(Error::BlockOutOfRange {
                block,
                num_blocks: registered.num_blocks(),
            });
        }
        Ok(BlockSetDescriptor {
            endpoint: self.endpoint.clone(),
            pool,
            block_bytes: registered.block_bytes() as u64,
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_through_json() -> std::result::Result<(), Box<dyn std::error::Error>>
    {
        let d = BlockSetDescriptor {
            endpoint: Endpoint::Tcp {
                addr: "127.0.0.1:4000".parse()?,
            },
            pool: PoolId(0xdead_beef),
            block_bytes: 8 << 20,
            blocks: vec![3, 1, 4],
        };
        let json = serde_json::to_string(&d)?;
        assert!(json.contains(r#""transport":"tcp""#), "{json}");
        assert_eq!(serde_json::from_str::<BlockSetDescriptor>(&json)?, d);
        Ok(())
    }

    #[test]
    fn describe_checks_blocks_against_the_pool() -> Result<()> {
        let reg = PoolRegistry::new(
            Endpoint::Shm {
                socket: "/tmp/x".into(),
            },
            false,
        );
        let id = reg.register(Arc::new(BlockPool::new(32, 4)?))?;
        assert_eq!(reg.describe(id, vec![0, 3])?.block_bytes, 32);
        assert!(matches!(
            reg.describe(id, vec![4]),
            Err(Error::BlockOutOfRange { block: 4, .. })
        ));
        assert!(reg.unregister(id));
        assert!(reg.describe(id, vec![0]).is_err());
        Ok(())
    }

    #[test]
    fn shm_registry_refuses_anonymous_pools() -> Result<()> {
        let reg = PoolRegistry::new(
            Endpoint::Shm {
                socket: "/tmp/x".into(),
            },
            true,
        );
        assert!(matches!(
            reg.register(Arc::new(BlockPool::new(32, 1)?)),
            Err(Error::PoolNotShareable)
        ));
        Ok(())
    }
}
