//! Bounded logging of bad input. A peer that sends garbage (a corrupted KV event stream, a client
//! in a loop) must not turn the log into its echo: 1.5 M bad frames a minute once wrote 424 k WARN
//! lines. A [`LogLimit`] lets the first few occurrences through, then at most one line per
//! interval, and that line says how many were left out since the last one. Counters (metrics) keep
//! the full count; the log keeps examples.
//!
//! ```
//! use std::time::Duration;
//! use dynamo_protocol::log_limit::LogLimit;
//!
//! static BAD_FRAMES: LogLimit = LogLimit::new(5, Duration::from_secs(10));
//! if let Some(suppressed) = BAD_FRAMES.allow() {
//!     tracing::warn!(suppressed, "skipping a malformed frame");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate limit for one kind of log line.
#[derive(Debug)]
pub struct LogLimit {
    first: u64,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    seen: u64,
    suppressed: u64,
    last: Option<Instant>,
}

impl LogLimit {
    /// Lets the first `first` occurrences through, then one per `interval`.
    pub const fn new(first: u64, interval: Duration) -> LogLimit {
        LogLimit {
            first,
            interval,
            state: Mutex::new(State {
                seen: 0,
                suppressed: 0,
                last: None,
            }),
        }
    }

    /// Records an occurrence. `Some(n)`: log it, saying `n` occurrences were left out since the
    /// last line; `None`: leave it out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.seen += 1;
        let due = s.seen <= self.first || s.last.is_none_or(|t| now >= t + self.interval);
        if !due {
            s.suppressed += 1;
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for LogLimit {
    /// The first 10, then one every 10 seconds.
    fn default() -> LogLimit {
        LogLimit::new(10, Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_ones_pass_then_one_per_interval_with_the_count_left_out() {
        let limit = LogLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(limit.allow_at(at(0)), Some(0));
        assert_eq!(limit.allow_at(at(0)), Some(0));
        assert_eq!(limit.allow_at(at(0)), Some(0));
        // A flood within the interval: nothing.
        for _ in 0..100_000 {
            assert_eq!(limit.allow_at(at(5)), None);
        }
        // The next line after the interval carries the count.
        assert_eq!(limit.allow_at(at(10)), Some(100_000));
        assert_eq!(limit.allow_at(at(11)), None);
        assert_eq!(limit.allow_at(at(25)), Some(1));
    }

    #[test]
    fn a_million_bad_frames_make_a_handful_of_lines() {
        let limit = LogLimit::default();
        let t0 = Instant::now();
        // 1.5 M occurrences spread over one minute.
        let lines = (0..1_500_000u64)
            .filter(|i| limit.allow_at(t0 + Duration::from_micros(i * 40)).is_some())
            .count();
        assert!(lines <= 10 + 6, "{lines} lines");
    }
}
