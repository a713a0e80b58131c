//! Step-duration model of the simulated GPU.
//!
//! One scheduler step models one forward pass of the batch. Its simulated duration is
//!
//! ```text
//! step = ( prefill_ms(t) + (decode_ms(u) if any sequence emits a token this step) ) / speedup
//! ```
//!
//! where `t` is the number of uncached prompt tokens computed in the step (the whole batch, chunks included)
//! and `u` the KV-cache fill fraction (blocks in use / `num_gpu_blocks`, in `[0, 1]`) once the step's blocks
//! are allocated. Both are quadratics whose coefficients default to Dynamo's mocker, so the two can be
//! compared:
//!
//! - `prefill_ms(t) = 4.209989e-7 t² + 1.518344e-2 t + 16.50142` (0 when `t == 0`)
//! - `decode_ms(u) = max(1, -25.74 u² + 54.01 u + 5.74)`

/// Quadratic step-time coefficients, each `[a, b, c]` for `a x² + b x + c` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimingModel {
    /// Prefill time as a function of the tokens prefilled in the step.
    pub prefill: [f64; 3],
    /// Decode time as a function of the KV-cache fill fraction.
    pub decode: [f64; 3],
}

impl Default for TimingModel {
    fn default() -> Self {
        Self {
            prefill: [4.209989e-7, 1.518344e-2, 16.50142],
            decode: [-25.74, 54.01, 5.74],
        }
    }
}

// === impl TimingModel ===

impl TimingModel {
    /// This model with every step time multiplied by `factor` (a slower or faster engine).
    pub fn scaled(self, factor: f64) -> TimingModel {
        let m = |[a, b, c]: [f64; 3]| [a * factor, b * factor, c * factor];
        TimingModel {
            prefill: m(self.prefill),
            decode: m(self.decode),
        }
    }

    /// Milliseconds to prefill `tokens` uncached prompt tokens in one step; 0 for no tokens.
    pub fn prefill_ms(&self, tokens: usize) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        quadratic(self.prefill, tokens as f64).max(0.0)
    }

    /// Milliseconds of one decode pass at KV-cache fill fraction `kv_fill` (clamped to `[0, 1]`); at least 1.
    pub fn decode_ms(&self, kv_fill: f64) -> f64 {
        quadratic(self.decode, kv_fill.clamp(0.0, 1.0)).max(1.0)
    }
}

fn quadratic([a, b, c]: [f64; 3], x: f64) -> f64 {
    (a * x + b) * x + c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn prefill_of_1000_tokens_follows_dynamo_coefficients() {
        let t = TimingModel::default();
        assert!(close(t.prefill_ms(1000), 0.4209989 + 15.18344 + 16.50142));
        assert_eq!(t.prefill_ms(0), 0.0);
    }

    #[test]
    fn decode_at_half_fill_follows_dynamo_coefficients() {
        let t = TimingModel::default();
        assert!(close(t.decode_ms(0.5), -6.435 + 27.005 + 5.74));
        assert!(close(t.decode_ms(0.0), 5.74));
    }

    #[test]
    fn decode_time_is_at_least_one_ms() {
        let t = TimingModel {
            prefill: [0.0; 3],
            decode: [0.0, -100.0, 0.0],
        };
        assert_eq!(t.decode_ms(0.7), 1.0);
    }
}
