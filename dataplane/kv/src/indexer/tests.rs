use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::hash::sequence_hash;

/// `(local, sequence)` pairs for a chain of local hashes following `parent`.
fn chain(parent: Option<u64>, locals: &[u64]) -> Vec<(u64, u64)> {
    let mut prev = parent;
    locals
        .iter()
        .map(|&l| {
            let s = sequence_hash(prev, l);
            prev = Some(s);
            (l, s)
        })
        .collect()
}

fn stored(parent: Option<u64>, locals: &[u64]) -> KvEvent {
    KvEvent::stored(parent, chain(parent, locals))
}

fn seq_of(locals: &[u64]) -> u64 {
    chain(None, locals).last().expect("non-empty").1
}

fn sorted(scores: &OverlapScores) -> Vec<(WorkerId, u32)> {
    let mut v: Vec<_> = scores
        .scores
        .iter()
        .map(|s| (s.worker, s.matched_blocks))
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn stored_chain_matches_every_leading_block() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    ix.apply(7, stored(None, &[10, 11, 12, 13]))?;
    assert_eq!(sorted(&ix.find_matches(&[10, 11, 12, 13])), vec![(7, 4)]);
    assert_eq!(sorted(&ix.find_matches(&[10, 11])), vec![(7, 2)]);
    assert_eq!(sorted(&ix.find_matches(&[10, 11, 99, 13])), vec![(7, 2)]);
    assert_eq!(
        sorted(&ix.find_matches(&[10, 11, 12, 13, 14])),
        vec![(7, 4)]
    );
    assert_eq!(sorted(&ix.find_matches(&[11])), vec![]);
    let s = ix.find_matches(&[10]).scores;
    assert_eq!(s[0].cached_blocks, 4);
    let st = ix.stats();
    assert_eq!((st.blocks, st.worker_block_refs, st.workers), (4, 4, 1));
    assert!(st.approx_bytes > 0);
    Ok(())
}

#[test]
fn stored_with_parent_extends_the_chain() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    ix.apply(1, stored(None, &[10, 11]))?;
    ix.apply(1, stored(Some(seq_of(&[10, 11])), &[12, 13]))?;
    assert_eq!(sorted(&ix.find_matches(&[10, 11, 12, 13])), vec![(1, 4)]);
    assert_eq!(ix.stats().blocks, 4);
    Ok(())
}

#[test]
fn workers_sharing_a_prefix_then_diverging_match_up_to_the_fork() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    ix.apply(1, stored(None, &[10, 11, 12, 13]))?;
    ix.apply(2, stored(None, &[10, 11, 20, 21, 22]))?;
    assert_eq!(
        sorted(&ix.find_matches(&[10, 11, 12, 13])),
        vec![(1, 4), (2, 2)]
    );
    assert_eq!(
        sorted(&ix.find_matches(&[10, 11, 20, 21, 22])),
        vec![(1, 2), (2, 5)]
    );
    assert_eq!(sorted(&ix.find_matches(&[10])), vec![(1, 1), (2, 1)]);
    let st = ix.stats();
    assert_eq!((st.blocks, st.worker_block_refs), (7, 9));
    Ok(())
}

#[test]
fn removing_a_middle_block_stops_the_match_there() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    ix.apply(1, stored(None, &[10, 11, 12, 13]))?;
    ix.apply(2, stored(None, &[10, 11, 12, 13]))?;
    ix.apply(
        1,
        KvEvent::Removed {
            block_hashes: vec![seq_of(&[10, 11])],
        },
    )?;
    assert_eq!(
        sorted(&ix.find_matches(&[10, 11, 12, 13])),
        vec![(1, 1), (2, 4)]
    );
    // The inner node stays (worker 2 and worker 1's later blocks still hang below it).
    assert_eq!(ix.stats().blocks, 4);
    assert_eq!(ix.stats().worker_block_refs, 7);
    Ok(())
}

#[test]
fn stored_under_unknown_parent_is_rejected_and_counted() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    let err = ix.apply(3, stored(Some(42), &[10, 11]));
    assert_eq!(
        err,
        Err(ApplyError::UnknownParent {
            worker: 3,
            parent: 42,
            blocks: 2
        })
    );
    // A parent held by another worker is still unknown to this one.
    ix.apply(1, stored(None, &[10]))?;
    assert!(ix.apply(3, stored(Some(seq_of(&[10])), &[11])).is_err());
    let st = ix.stats();
    assert_eq!(st.dropped_stored_events, 2);
    assert_eq!((st.blocks, st.worker_block_refs), (1, 1));
    assert_eq!(sorted(&ix.find_matches(&[10, 11])), vec![(1, 1)]);
    Ok(())
}

#[test]
fn removing_an_unknown_hash_is_a_counted_no_op() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    ix.apply(1, stored(None, &[10]))?;
    ix.apply(
        1,
        KvEvent::Removed {
            block_hashes: vec![999],
        },
    )?;
    ix.apply(
        2,
        KvEvent::Removed {
            block_hashes: vec![seq_of(&[10])],
        },
    )?;
    assert_eq!(ix.stats().unknown_removes, 2);
    assert_eq!(sorted(&ix.find_matches(&[10])), vec![(1, 1)]);
    Ok(())
}

#[test]
fn remove_worker_clears_only_that_worker_and_prunes() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    ix.apply(1, stored(None, &[10, 11, 12]))?;
    ix.apply(2, stored(None, &[10, 11, 20, 21]))?;
    ix.remove_worker(2);
    assert_eq!(sorted(&ix.find_matches(&[10, 11, 20, 21])), vec![(1, 2)]);
    let st = ix.stats();
    assert_eq!((st.blocks, st.worker_block_refs, st.workers), (3, 3, 1));
    ix.remove_worker(1);
    let st = ix.stats();
    assert_eq!((st.blocks, st.worker_block_refs, st.workers), (0, 0, 0));
    // A returning worker starts from nothing (its dense index may be reused).
    ix.apply(2, stored(None, &[10]))?;
    assert_eq!(sorted(&ix.find_matches(&[10, 11])), vec![(2, 1)]);
    Ok(())
}

#[test]
fn cleared_drops_every_block_of_that_worker_only() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    ix.apply(1, stored(None, &[10, 11, 12]))?;
    ix.apply(2, stored(None, &[10, 11]))?;
    ix.apply(1, KvEvent::Cleared)?;
    assert_eq!(sorted(&ix.find_matches(&[10, 11, 12])), vec![(2, 2)]);
    let st = ix.stats();
    assert_eq!((st.blocks, st.worker_block_refs, st.workers), (2, 2, 2));
    // The cleared worker can store again from the root.
    ix.apply(1, stored(None, &[10, 30]))?;
    assert_eq!(sorted(&ix.find_matches(&[10, 30])), vec![(1, 2), (2, 1)]);
    Ok(())
}

#[test]
fn matching_against_an_empty_index_or_request_finds_nothing() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    assert!(ix.find_matches(&[1, 2, 3]).scores.is_empty());
    ix.apply(1, stored(None, &[1, 2]))?;
    assert!(ix.find_matches(&[]).scores.is_empty());
    assert!(ix.find_matches(&[5, 1, 2]).scores.is_empty());
    Ok(())
}

#[test]
fn more_than_64_workers_and_wide_fanout_are_indexed() -> Result<(), ApplyError> {
    let ix = KvIndexer::new();
    for w in 0..300u64 {
        // Every worker shares block 1, then has its own second block; some also share block 1's child 2.
        ix.apply(w, stored(None, &[1, 1000 + w]))?;
        if w % 3 == 0 {
            ix.apply(w, stored(Some(seq_of(&[1])), &[2]))?;
        }
    }
    let all = ix.find_matches(&[1]);
    assert_eq!(all.scores.len(), 300);
    let m = ix.find_matches(&[1, 1000 + 299]);
    assert_eq!(m.matched_blocks(299), 2);
    assert_eq!(m.matched_blocks(5), 1);
    let m = ix.find_matches(&[1, 2]);
    assert_eq!(m.matched_blocks(3), 2);
    assert_eq!(m.matched_blocks(4), 1);
    assert_eq!(ix.stats().blocks, 302);
    for w in 0..300u64 {
        ix.remove_worker(w);
    }
    assert_eq!(ix.stats().blocks, 0);
    Ok(())
}

#[test]
fn indexer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<KvIndexer>();
}

// === property test against a model ===

/// Per worker, the set of sequence hashes it holds. A request's match for a worker is the longest prefix
/// whose sequence hashes are all held.
#[derive(Default)]
struct Model {
    held: BTreeMap<WorkerId, HashSet<u64>>,
}

impl Model {
    fn apply(&mut self, worker: WorkerId, event: &KvEvent) -> bool {
        match event {
            KvEvent::Stored {
                parent_hash,
                blocks,
            } => {
                if let Some(p) = parent_hash
                    && !self.held.get(&worker).is_some_and(|h| h.contains(p))
                {
                    return false;
                }
                let h = self.held.entry(worker).or_default();
                h.extend(blocks.iter().map(|b| b.block_hash));
            }
            KvEvent::Removed { block_hashes } => {
                if let Some(h) = self.held.get_mut(&worker) {
                    for s in block_hashes {
                        h.remove(s);
                    }
                }
            }
            KvEvent::Cleared | KvEvent::Unknown => {
                if let Some(h) = self.held.get_mut(&worker) {
                    h.clear();
                }
            }
        }
        true
    }

    fn matches(&self, request: &[u64]) -> Vec<(WorkerId, u32)> {
        let seqs = chain(None, request);
        self.held
            .iter()
            .filter_map(|(&w, h)| {
                let n = seqs.iter().take_while(|s| h.contains(&s.1)).count();
                (n > 0).then_some((w, n as u32))
            })
            .collect()
    }

    fn refs(&self) -> usize {
        self.held.values().map(HashSet::len).sum()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Store {
        worker: WorkerId,
        parent: Vec<u64>,
        blocks: Vec<u64>,
    },
    Remove {
        worker: WorkerId,
        paths: Vec<Vec<u64>>,
    },
    Clear {
        worker: WorkerId,
    },
    RemoveWorker {
        worker: WorkerId,
    },
}

/// Local hashes from a tiny alphabet so that paths share prefixes and collide often.
fn path(max: usize) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(1u64..4, 0..=max)
}

fn op() -> impl Strategy<Value = Op> {
    let worker = 0u64..4;
    prop_oneof![
        6 => (worker.clone(), path(3), prop::collection::vec(1u64..4, 1..5))
            .prop_map(|(worker, parent, blocks)| Op::Store { worker, parent, blocks }),
        3 => (worker.clone(), prop::collection::vec(prop::collection::vec(1u64..4, 1..5), 1..3))
            .prop_map(|(worker, paths)| Op::Remove { worker, paths }),
        1 => worker.clone().prop_map(|worker| Op::Clear { worker }),
        1 => worker.prop_map(|worker| Op::RemoveWorker { worker }),
    ]
}

proptest! {
    #[test]
    fn find_matches_equals_the_model(ops in prop::collection::vec(op(), 1..40),
                                     requests in prop::collection::vec(path(6), 1..8)) {
        let ix = KvIndexer::new();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Store { worker, parent, blocks } => {
                    let parent = (!parent.is_empty()).then(|| seq_of(&parent));
                    let event = stored(parent, &blocks);
                    let ok = model.apply(worker, &event);
                    prop_assert_eq!(ix.apply(worker, event).is_ok(), ok);
                }
                Op::Remove { worker, paths } => {
                    let event = KvEvent::Removed {
                        block_hashes: paths.iter().map(|p| seq_of(p)).collect(),
                    };
                    model.apply(worker, &event);
                    prop_assert!(ix.apply(worker, event).is_ok());
                }
                Op::Clear { worker } => {
                    model.apply(worker, &KvEvent::Cleared);
                    prop_assert!(ix.apply(worker, KvEvent::Cleared).is_ok());
                }
                Op::RemoveWorker { worker } => {
                    model.held.remove(&worker);
                    ix.remove_worker(worker);
                }
            }
            prop_assert_eq!(ix.stats().worker_block_refs, model.refs());
            for r in &requests {
                prop_assert_eq!(sorted(&ix.find_matches(r)), model.matches(r), "request {:?}", r);
            }
        }
        // Once every worker is gone, everything is pruned.
        for w in 0..4 {
            ix.remove_worker(w);
        }
        let st = ix.stats();
        prop_assert_eq!((st.blocks, st.worker_block_refs, st.workers), (0, 0, 0));
    }
}
