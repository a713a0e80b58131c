//! Next-interval forecasts of one series (request rate, ISL, OSL).

/// How the next value of a series is forecast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PredictorKind {
    /// The last value.
    Constant,
    /// Holt's linear trend (double exponential smoothing): follows ramps without the lag of a
    /// moving average.
    #[default]
    Holt,
    /// ARIMA(1,1,0) fitted by least squares on the recent differences (Dynamo's default predictor
    /// is an automatically ordered ARIMA; this is its most common low-order form).
    Arima,
}

/// A forecaster over one series.
#[derive(Debug, Clone)]
pub struct Predictor {
    kind: PredictorKind,
    history: Vec<f64>,
    level: f64,
    trend: f64,
}

/// Holt's smoothing weights for the level and the trend.
const ALPHA: f64 = 0.6;
const BETA: f64 = 0.3;
/// Values the ARIMA fit looks back over.
const WINDOW: usize = 30;

impl Predictor {
    pub fn new(kind: PredictorKind) -> Predictor {
        Predictor {
            kind,
            history: Vec::new(),
            level: 0.0,
            trend: 0.0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        if self.history.is_empty() {
            self.level = value;
            self.trend = 0.0;
        } else {
            let prev = self.level;
            self.level = ALPHA * value + (1.0 - ALPHA) * (self.level + self.trend);
            self.trend = BETA * (self.level - prev) + (1.0 - BETA) * self.trend;
        }
        self.history.push(value);
        if self.history.len() > WINDOW {
            self.history.remove(0);
        }
    }

    /// The forecast of the next value (never negative); `None` before any observation.
    pub fn forecast(&self) -> Option<f64> {
        let last = *self.history.last()?;
        let f = match self.kind {
            PredictorKind::Constant => last,
            PredictorKind::Holt => self.level + self.trend,
            PredictorKind::Arima => {
                let d: Vec<f64> = self.history.windows(2).map(|w| w[1] - w[0]).collect();
                if d.len() < 3 {
                    last
                } else {
                    // d[t] = phi d[t-1]: least squares over the pairs.
                    let (num, den) = d
                        .windows(2)
                        .fold((0.0, 0.0), |(n, m), w| (n + w[0] * w[1], m + w[0] * w[0]));
                    let phi = if den > 0.0 {
                        (num / den).clamp(-0.99, 0.99)
                    } else {
                        0.0
                    };
                    last + phi * d[d.len() - 1]
                }
            }
        };
        Some(f.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_follows_a_flat_series() {
        for kind in [
            PredictorKind::Constant,
            PredictorKind::Holt,
            PredictorKind::Arima,
        ] {
            let mut p = Predictor::new(kind);
            assert_eq!(p.forecast(), None);
            for _ in 0..10 {
                p.observe(5.0);
            }
            assert!((p.forecast().expect("some") - 5.0).abs() < 1e-9, "{kind:?}");
        }
    }

    #[test]
    fn trend_predictors_extrapolate_a_ramp() {
        for kind in [PredictorKind::Holt, PredictorKind::Arima] {
            let mut p = Predictor::new(kind);
            for i in 0..20 {
                p.observe(f64::from(i) * 2.0);
            }
            let f = p.forecast().expect("some");
            assert!(f > 38.0 && f < 42.5, "{kind:?}: {f}");
        }
        let mut p = Predictor::new(PredictorKind::Holt);
        for v in [10.0, 0.0, 0.0] {
            p.observe(v);
        }
        assert!(p.forecast().expect("some") >= 0.0, "never negative");
    }
}
