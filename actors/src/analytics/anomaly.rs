//! The z-score rule: how far the newest value lies from the window's mean, in standard
//! deviations, and whether that is an anomaly — for rps (the original signal) and cpu.

use super::{Stats, Window};

/// The result of analysing a window after its newest reading was pushed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Readings in the window, the newest included.
    pub samples: usize,
    /// Mean rps of the window.
    pub rolling_average_rps: f64,
    /// Population standard deviation of rps over the window.
    pub stddev_rps: f64,
    /// Mean cpu of the window.
    pub rolling_average_cpu: f64,
    /// |x − mean| / stddev, or 0 when the window has < 2 values or no spread.
    pub z_score: f64,
    /// z_score strictly above the threshold.
    pub is_anomaly: bool,
    /// Population standard deviation of cpu over the window.
    pub stddev_cpu: f64,
    /// The z-score of the newest cpu value.
    pub cpu_z_score: f64,
    /// cpu_z_score strictly above the threshold.
    pub is_cpu_anomaly: bool,
}

impl Evaluation {
    /// Whether `signal` is anomalous.
    pub fn is_anomalous(&self, signal: Signal) -> bool {
        match signal {
            Signal::Rps => self.is_anomaly,
            Signal::Cpu => self.is_cpu_anomaly,
        }
    }
}

/// A measured value the z-score rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Requests per second (the original service's only signal).
    Rps,
    /// CPU load.
    Cpu,
}

impl Signal {
    /// Both signals.
    pub const ALL: [Signal; 2] = [Signal::Rps, Signal::Cpu];

    /// The name in settings, labels and stream entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Rps => "rps",
            Signal::Cpu => "cpu",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// z = |x − mean| / stddev, or 0 when the window has < 2 values or no spread.
fn z(stats: &Stats, x: f64) -> f64 {
    if stats.samples < 2 || stats.stddev == 0.0 {
        0.0
    } else {
        (x - stats.mean).abs() / stats.stddev
    }
}

/// The anomaly threshold in standard deviations (strictly greater is anomalous).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnomalyRule {
    /// Threshold on the z-score.
    pub threshold: f64,
}

impl AnomalyRule {
    /// Analyses `window` after its newest reading was pushed (an empty window gives
    /// zeros).
    pub fn evaluate(&self, window: &Window) -> Evaluation {
        let (rps, cpu) = window.newest().unwrap_or((0.0, 0.0));
        let (rps_stats, cpu_stats) = window.stats();
        let z_score = z(&rps_stats, rps);
        let cpu_z_score = z(&cpu_stats, cpu);
        Evaluation {
            samples: rps_stats.samples,
            rolling_average_rps: rps_stats.mean,
            stddev_rps: rps_stats.stddev,
            rolling_average_cpu: cpu_stats.mean,
            z_score,
            is_anomaly: z_score > self.threshold,
            stddev_cpu: cpu_stats.stddev,
            cpu_z_score,
            is_cpu_anomaly: cpu_z_score > self.threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyse(values: &[f64], threshold: f64) -> Evaluation {
        let mut w = Window::new(50);
        for &x in values {
            w.push(x, 0.5);
        }
        AnomalyRule { threshold }.evaluate(&w)
    }

    #[test]
    fn cpu_has_the_same_rule_and_its_own_statistics() {
        let mut w = Window::new(50);
        for i in 0..20 {
            w.push(100.0, 0.20 + f64::from(i % 3) * 0.01);
        }
        w.push(100.0, 0.95);
        let e = AnomalyRule { threshold: 2.0 }.evaluate(&w);
        assert!(e.is_cpu_anomaly && !e.is_anomaly, "{e:?}");
        assert!(e.cpu_z_score > 3.0 && e.stddev_cpu > 0.0);
        assert_eq!((e.z_score, e.stddev_rps), (0.0, 0.0));
        assert!(e.is_anomalous(Signal::Cpu) && !e.is_anomalous(Signal::Rps));
        assert_eq!(Signal::parse("cpu"), Some(Signal::Cpu));
        assert_eq!(Signal::parse("mem"), None);
    }

    #[test]
    fn single_value_is_never_anomalous() {
        let a = analyse(&[1000.0], 0.0);
        assert_eq!((a.z_score, a.is_anomaly, a.samples), (0.0, false, 1));
    }

    #[test]
    fn equal_values_have_zero_z() {
        let a = analyse(&[5.0; 10], 0.0);
        assert_eq!((a.z_score, a.is_anomaly), (0.0, false));
    }

    #[test]
    fn spike_after_steady_values_is_anomalous() {
        let mut values = vec![
            100.0, 101.0, 99.0, 100.0, 102.0, 98.0, 100.0, 101.0, 99.0, 100.0,
        ];
        values.push(500.0);
        let a = analyse(&values, 2.0);
        assert!(a.is_anomaly, "{a:?}");
        assert!(a.z_score > 3.0);
    }

    #[test]
    fn threshold_is_strict() {
        // Two values: z is exactly 1 for either of them.
        let a = analyse(&[1.0, 3.0], 1.0);
        assert_eq!(a.z_score, 1.0);
        assert!(!a.is_anomaly);
        assert!(analyse(&[1.0, 3.0], 0.999).is_anomaly);
    }

    #[test]
    fn small_windows_cannot_exceed_the_bound() {
        // With x included and the population deviation, z ≤ √(n−1): exactly 2 for
        // n = 5, which the strict threshold does not count.
        let a = analyse(&[0.0, 0.0, 0.0, 0.0, 1e9], 2.0);
        assert_eq!(a.z_score, 2.0);
        assert!(!a.is_anomaly);
        let a = analyse(&[7.0, 7.0, 7.0, 7.0, 7.0, 1e9], 2.0);
        assert!((a.z_score - 5f64.sqrt()).abs() < 1e-12, "{}", a.z_score);
        assert!(a.is_anomaly);
    }
}
