//! The rolling window of one device: the newest `capacity` (rps, cpu) pairs and exact-enough
//! statistics over them.
//!
//! Statistics are recomputed over the whole window on every event (two passes with
//! compensated summation). Running sums of x and x² would be O(1) but lose every digit on
//! large steady values (1e9 ± 1 has x² ≈ 1e18, beyond f64's 16 digits); at the default
//! window of 50 the two-pass costs well under a microsecond, and its error stays near one
//! ulp for any window size.

use std::collections::VecDeque;

/// Mean and population standard deviation of a window, plus its length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Number of values in the window.
    pub samples: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Population standard deviation (divides by n); exactly 0 when all values are equal.
    pub stddev: f64,
}

/// A bounded FIFO of the newest (rps, cpu) readings of one device.
#[derive(Debug, Clone)]
pub struct Window {
    capacity: usize,
    readings: VecDeque<(f64, f64)>,
}

impl Window {
    /// An empty window keeping at most `capacity` readings (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            // Grown on demand: most devices of a large fleet hold few readings at a time.
            readings: VecDeque::new(),
        }
    }

    /// A window restored from persisted readings (oldest first); keeps the newest
    /// `capacity`.
    pub fn restore(capacity: usize, readings: impl IntoIterator<Item = (f64, f64)>) -> Self {
        let mut window = Self::new(capacity);
        for (rps, cpu) in readings {
            window.push(rps, cpu);
        }
        window
    }

    /// Appends one reading, evicting the oldest when full.
    pub fn push(&mut self, rps: f64, cpu: f64) {
        let len = self.readings.len();
        if len == self.capacity {
            self.readings.pop_front();
        } else if len == self.readings.capacity() {
            // Double, but never beyond the window: a full window of 50 holds 50, not 64.
            self.readings
                .reserve_exact((len * 2).max(4).min(self.capacity) - len);
        }
        self.readings.push_back((rps, cpu));
    }

    /// Statistics of rps and cpu, in one pair of passes.
    pub fn stats(&self) -> (Stats, Stats) {
        let [rps, cpu] = stats(
            self.readings.len(),
            self.readings.iter().map(|&(r, c)| [r, c]),
        );
        (rps, cpu)
    }

    /// The newest (rps, cpu) reading.
    pub fn newest(&self) -> Option<(f64, f64)> {
        self.readings.back().copied()
    }

    /// The (rps, cpu) readings, oldest first.
    pub fn readings(&self) -> impl ExactSizeIterator<Item = (f64, f64)> + Clone + '_ {
        self.readings.iter().copied()
    }
}

/// Neumaier's compensated sum: the error stays O(ulp) independent of the number of terms.
fn compensated_sum(values: impl Iterator<Item = f64>) -> f64 {
    let mut sum = 0.0_f64;
    let mut compensation = 0.0_f64;
    for x in values {
        let t = sum + x;
        if sum.abs() >= x.abs() {
            compensation += (sum - t) + x;
        } else {
            compensation += (x - t) + sum;
        }
        sum = t;
    }
    sum + compensation
}

/// Two-pass statistics of finite values, of `L` series at once (rps and cpu share the
/// passes over the window: the two dependency chains then overlap in the CPU, which
/// nearly halves their cost next to one pass each).
///
/// Pass one: min, max and a compensated sum (the mean must be accurate to about an ulp:
/// z divides the newest value's distance from it by a deviation that may be 1e-5 of it).
/// Pass two: deviations from the mean, scaled by the value range so that squaring can
/// neither overflow (values near f64::MAX) nor underflow (subnormal differences); plain
/// sums suffice there, every term being positive or a first-order correction. The
/// all-equal case is detected explicitly: the computed mean of n equal values need not
/// be bit-identical to them (n·v/n rounds), and a tiny non-zero deviation would turn into
/// an arbitrary z-score.
fn stats<const L: usize>(n: usize, values: impl Iterator<Item = [f64; L]> + Clone) -> [Stats; L] {
    if n == 0 {
        return [Stats {
            samples: 0,
            mean: 0.0,
            stddev: 0.0,
        }; L];
    }
    let (mut min, mut max) = ([f64::INFINITY; L], [f64::NEG_INFINITY; L]);
    let (mut sum, mut compensation) = ([0.0_f64; L], [0.0_f64; L]);
    for xs in values.clone() {
        for l in 0..L {
            let x = xs[l];
            min[l] = min[l].min(x);
            max[l] = max[l].max(x);
            let t = sum[l] + x;
            compensation[l] += if sum[l].abs() >= x.abs() {
                (sum[l] - t) + x
            } else {
                (x - t) + sum[l]
            };
            sum[l] = t;
        }
    }
    let nf = n as f64;
    let (mut mean, mut inv_range) = ([0.0_f64; L], [0.0_f64; L]);
    for l in 0..L {
        if min[l] == max[l] {
            // All equal: exactly that value, and no deviation (inv_range 0 below).
            mean[l] = min[l];
            continue;
        }
        let total = sum[l] + compensation[l];
        mean[l] = if total.is_finite() {
            total / nf
        } else {
            // Only reachable near f64::MAX: divide first so the sum cannot overflow.
            compensated_sum(values.clone().map(|xs| xs[l] / nf))
        }
        .clamp(min[l], max[l]);
        inv_range[l] = 1.0 / (max[l] - min[l]);
    }
    let (mut sum_sq, mut sum_d) = ([0.0_f64; L], [0.0_f64; L]);
    for xs in values {
        for l in 0..L {
            let d = (xs[l] - mean[l]) * inv_range[l];
            sum_sq[l] += d * d;
            sum_d[l] += d;
        }
    }
    std::array::from_fn(|l| {
        // The second term corrects for the rounding of `mean` (the "corrected two-pass").
        let variance = ((sum_sq[l] - sum_d[l] * sum_d[l] / nf) / nf).max(0.0);
        Stats {
            samples: n,
            mean: mean[l],
            stddev: (max[l] - min[l]) * variance.sqrt(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_newest_values() {
        let mut w = Window::new(3);
        for x in [1.0, 2.0, 3.0, 4.0, 5.0] {
            w.push(x, x / 10.0);
        }
        assert_eq!(
            w.readings().collect::<Vec<_>>(),
            vec![(3.0, 0.3), (4.0, 0.4), (5.0, 0.5)]
        );
        assert_eq!(w.readings().len(), 3);
    }

    #[test]
    fn population_standard_deviation() {
        let mut w = Window::new(10);
        for x in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
            w.push(x, 0.5);
        }
        let s = w.stats().0;
        assert_eq!(s.samples, 8);
        assert!((s.mean - 5.0).abs() < 1e-12);
        assert!((s.stddev - 2.0).abs() < 1e-12);
    }

    #[test]
    fn equal_values_have_exactly_zero_deviation() {
        let mut w = Window::new(50);
        for _ in 0..7 {
            w.push(0.1, 0.3);
        }
        let s = w.stats().0;
        assert_eq!(s.stddev, 0.0);
        assert_eq!(s.mean, 0.1);
    }

    #[test]
    fn large_steady_values_keep_their_spread() {
        let mut w = Window::new(4);
        for x in [1e9, 1e9 + 1.0, 1e9, 1e9 + 1.0] {
            w.push(x, 0.0);
        }
        let s = w.stats().0;
        assert_eq!(s.mean, 1e9 + 0.5);
        assert!((s.stddev - 0.5).abs() < 1e-12, "{}", s.stddev);
    }

    #[test]
    fn extreme_magnitudes_stay_finite() {
        let mut w = Window::new(4);
        w.push(f64::MAX, 0.0);
        w.push(0.0, 0.0);
        let s = w.stats().0;
        assert!(s.mean.is_finite() && s.stddev.is_finite());
        assert!((s.stddev / (f64::MAX / 2.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cpu_mean_is_exact_where_a_plain_sum_is_not() {
        let mut w = Window::new(10);
        assert_eq!(w.readings().len(), 0);
        assert_eq!(w.stats().1.mean, 0.0);
        for _ in 0..10 {
            w.push(1.0, 0.1);
        }
        assert_eq!(w.readings().len(), 10);
        // A plain left-to-right sum of ten 0.1 is 0.9999999999999999.
        assert_eq!(w.stats().1.mean, 0.1);
        w.push(1.0, 0.6);
        assert_eq!(w.stats().1.mean, 0.15);
    }

    #[test]
    fn compensated_sum_keeps_small_terms_beside_huge_ones() {
        // Neumaier's example: Kahan's sum and a plain sum both give 0.
        assert_eq!(compensated_sum([1.0, 1e100, 1.0, -1e100].into_iter()), 2.0);
        assert_eq!(compensated_sum([1e100, 1.0, -1e100, 1.0].into_iter()), 2.0);
        assert_eq!(compensated_sum(std::iter::empty()), 0.0);
    }

    #[test]
    fn the_mean_is_exact_where_a_plain_sum_is_not() {
        // 1e16 + 1 rounds back to 1e16 (the spacing there is 2): a plain sum gives
        // 1e16, whose third is 3333333333333333.5; the exact mean is 3333333333333334.
        let w = Window::restore(3, [(1e16, 0.0), (1.0, 0.0), (1.0, 0.0)]);
        assert_eq!(w.stats().0.mean, 3_333_333_333_333_334.0);
    }

    #[test]
    fn a_rounded_mean_does_not_inflate_the_deviation() {
        // The mean 1e15 + 1/3 is not representable (spacing 0.125): the deviations
        // from the rounded mean need the corrected two-pass formula.
        let w = Window::restore(3, [(1e15, 0.0), (1e15, 0.0), (1e15 + 1.0, 0.0)]);
        let s = w.stats().0;
        let exact = 2f64.sqrt() / 3.0;
        assert!((s.stddev / exact - 1.0).abs() < 1e-12, "{}", s.stddev);
    }

    #[test]
    fn values_whose_sum_overflows_have_a_finite_mean_and_deviation() {
        let w = Window::restore(2, [(f64::MAX, 0.0), (f64::MAX / 2.0, 0.0)]);
        let s = w.stats().0;
        assert!(
            (s.mean / (0.75 * f64::MAX) - 1.0).abs() < 1e-12,
            "{}",
            s.mean
        );
        assert!(
            (s.stddev / (0.25 * f64::MAX) - 1.0).abs() < 1e-12,
            "{}",
            s.stddev
        );
    }

    #[test]
    fn restore_keeps_newest_when_capacity_shrank() {
        let w = Window::restore(2, [(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)]);
        assert_eq!(
            w.readings().collect::<Vec<_>>(),
            vec![(2.0, 0.2), (3.0, 0.3)]
        );
    }
}
