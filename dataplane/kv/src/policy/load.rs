//! The load-only policies: where a request goes when only the number of requests in flight on each
//! worker counts (and the mode enum that names every policy, `kv` included).

use rand::Rng;

/// How the frontend spreads requests over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Each live worker in turn.
    RoundRobin,
    /// A uniformly random live worker.
    Random,
    /// The live worker with the fewest requests in flight (ties: rotate).
    LeastLoaded,
    /// Two random live workers; the one with fewer requests in flight.
    PowerOfTwo,
    /// The worker where the request is cheapest: prefix-cache overlap from KV events against load
    /// (see [`super::kv`]).
    Kv,
}

impl RouterMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::LeastLoaded => "least-loaded",
            RouterMode::PowerOfTwo => "power-of-two",
            RouterMode::Kv => "kv",
        }
    }
}

/// Chooses among `loads` (in-flight requests of each candidate). `tick` is a counter the caller
/// advances per decision (round-robin position, tie-breaking). Returns an index into `loads`.
pub fn select<R: Rng + ?Sized>(
    mode: RouterMode,
    loads: &[u32],
    tick: usize,
    rng: &mut R,
) -> Option<usize> {
    let n = loads.len();
    if n == 0 {
        return None;
    }
    Some(match mode {
        RouterMode::RoundRobin => tick % n,
        RouterMode::Random => rng.random_range(0..n),
        // Without prompt tokens (see `WorkerPool::pick`) the kv policy degrades to least-loaded.
        RouterMode::LeastLoaded | RouterMode::Kv => {
            // Start the scan at a rotating offset so ties do not always favour worker 0.
            let start = tick % n;
            (0..n)
                .map(|k| (start + k) % n)
                .min_by_key(|&i| loads[i])
                .unwrap_or(start)
        }
        RouterMode::PowerOfTwo => {
            if n == 1 {
                0
            } else {
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                if loads[b] < loads[a] { b } else { a }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn round_robin_cycles_through_every_worker() {
        let mut rng = SmallRng::seed_from_u64(1);
        let picks: Vec<_> = (0..6)
            .map(|t| select(RouterMode::RoundRobin, &[0, 0, 0], t, &mut rng))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
    }

    #[test]
    fn least_loaded_picks_the_minimum_and_rotates_ties() {
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(
            select(RouterMode::LeastLoaded, &[5, 2, 9], 0, &mut rng),
            Some(1)
        );
        let ties: Vec<_> = (0..3)
            .map(|t| select(RouterMode::LeastLoaded, &[1, 1, 1], t, &mut rng))
            .collect();
        assert_eq!(ties, [0, 1, 2].map(Some));
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_two() {
        let mut rng = SmallRng::seed_from_u64(7);
        for t in 0..1000 {
            let pick = select(RouterMode::PowerOfTwo, &[0, 100], t, &mut rng);
            assert_eq!(pick, Some(0));
        }
    }

    #[test]
    fn random_spreads_over_all_workers() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut seen = [0u32; 4];
        for t in 0..4000 {
            seen[select(RouterMode::Random, &[0; 4], t, &mut rng).unwrap_or(9)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn no_candidates_means_no_pick() {
        let mut rng = SmallRng::seed_from_u64(3);
        for mode in [
            RouterMode::RoundRobin,
            RouterMode::Random,
            RouterMode::LeastLoaded,
            RouterMode::PowerOfTwo,
        ] {
            assert_eq!(select(mode, &[], 0, &mut rng), None);
        }
    }
}
