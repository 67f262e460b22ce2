//! The analytics agree with exact arithmetic to the documented 1e-9 relative accuracy
//! (docs/api.md, "Analytics").
//!
//! The reference is exact: every f64 is an integer times a power of two, so scaling the
//! window by its smallest power of two turns mean and variance into integer arithmetic on
//! big integers, with a single rounding at the end.

use actors::analytics::{AnomalyRule, Window};
use num_bigint::BigInt;
use num_traits::{Float, ToPrimitive, Zero};
use proptest::prelude::*;

struct Exact {
    mean: f64,
    stddev: f64,
    /// |x_last − mean|
    deviation: f64,
    all_equal: bool,
}

fn exact_stats(values: &[f64]) -> Exact {
    let decoded: Vec<(u64, i16)> = values
        .iter()
        .map(|&x| {
            let (mantissa, exponent, sign) = x.integer_decode();
            assert_eq!(sign, 1, "values are non-negative");
            (mantissa, exponent)
        })
        .collect();
    let base = decoded
        .iter()
        .filter(|(m, _)| *m != 0)
        .map(|&(_, e)| e)
        .min()
        .unwrap_or(0);
    let ints: Vec<BigInt> = decoded
        .iter()
        .map(|&(m, e)| BigInt::from(m) << ((e - base) as usize))
        .collect();
    let n = BigInt::from(values.len());
    let sum: BigInt = ints.iter().sum();
    let sum_sq: BigInt = ints.iter().map(|x| x * x).sum();
    let numerator = &n * &sum_sq - &sum * &sum; // n²·Var, scaled by 2^(−2·base)
    let last = ints.last().expect("non-empty");
    let dev = (&n * last - &sum).magnitude().clone();
    let scale = 2f64.powi(base as i32);
    let nf = values.len() as f64;
    let to_f64 = |b: &BigInt| b.to_f64().expect("finite");
    Exact {
        mean: to_f64(&sum) / nf * scale,
        stddev: (to_f64(&numerator).sqrt() / nf) * scale,
        deviation: to_f64(&BigInt::from(dev)) / nf * scale,
        all_equal: numerator.is_zero(),
    }
}

fn close(got: f64, want: f64, scale: f64) -> bool {
    (got - want).abs() <= 1e-9 * scale
}

/// Values around a baseline with a relative spread from 1 down to 1e-6, or spread
/// uniformly over 0..1e9, sometimes with long runs of one value.
fn series(max_len: usize) -> impl Strategy<Value = Vec<f64>> {
    let around_base = (0.0..1e9f64, 0u32..=6, 1..=max_len).prop_flat_map(|(base, k, len)| {
        let spread = base * 10f64.powi(-(k as i32));
        prop::collection::vec(-1.0..=1.0f64, len)
            .prop_map(move |us| us.iter().map(|u| (base + u * spread).max(0.0)).collect())
    });
    let uniform = prop::collection::vec(0.0..1e9f64, 1..=max_len);
    let runs = (0.0..1e9f64, 1..=max_len, 0.0..1e9f64)
        .prop_map(|(v, len, last)| std::iter::repeat_n(v, len - 1).chain([last]).collect());
    prop_oneof![around_base, uniform, runs]
}

/// The statistics of one signal as the rule computed them.
struct Got {
    mean: f64,
    stddev: f64,
    z: f64,
    anomaly: bool,
}

fn check(window_size: usize, values: &[f64]) -> Result<(), TestCaseError> {
    // rps carries the series; cpu the same series mapped into 0..1 and reversed, so the
    // two signals differ and each is checked against its own exact reference.
    let cpus: Vec<f64> = values.iter().rev().map(|x| x / 1e9).collect();
    let mut window = Window::new(window_size);
    for (&x, &c) in values.iter().zip(&cpus) {
        window.push(x, c);
    }
    let got = AnomalyRule { threshold: 2.0 }.evaluate(&window);
    let kept = &values[values.len().saturating_sub(window_size)..];
    prop_assert_eq!(got.samples, kept.len());
    let kept_cpu = &cpus[cpus.len().saturating_sub(window_size)..];
    check_signal(
        kept,
        &Got {
            mean: got.rolling_average_rps,
            stddev: got.stddev_rps,
            z: got.z_score,
            anomaly: got.is_anomaly,
        },
    )?;
    check_signal(
        kept_cpu,
        &Got {
            mean: got.rolling_average_cpu,
            stddev: got.stddev_cpu,
            z: got.cpu_z_score,
            anomaly: got.is_cpu_anomaly,
        },
    )
}

fn check_signal(kept: &[f64], got: &Got) -> Result<(), TestCaseError> {
    let exact = exact_stats(kept);
    prop_assert!(close(
        got.mean,
        exact.mean,
        exact.mean.max(f64::MIN_POSITIVE)
    ));
    if kept.len() < 2 || exact.all_equal {
        prop_assert_eq!(got.stddev, 0.0);
        prop_assert_eq!(got.z, 0.0);
        prop_assert!(!got.anomaly);
        return Ok(());
    }
    if exact.stddev < 1e-5 * exact.mean {
        // Outside the documented accuracy promise; the results must still be sane.
        prop_assert!(got.stddev.is_finite() && got.z.is_finite());
        return Ok(());
    }
    prop_assert!(
        close(got.stddev, exact.stddev, exact.stddev),
        "stddev {} vs exact {}",
        got.stddev,
        exact.stddev
    );
    let z = exact.deviation / exact.stddev;
    // z's natural scale is the threshold: a z near 0 is compared absolutely.
    prop_assert!(close(got.z, z, z.max(1.0)), "z {} vs exact {}", got.z, z);
    if (z - 2.0).abs() > 1e-9 {
        prop_assert_eq!(got.anomaly, z > 2.0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn small_windows_match_exact_statistics(window in 1usize..=64, values in series(200)) {
        check(window, &values)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn large_windows_match_exact_statistics(window in 1usize..=10_000, values in series(12_000)) {
        check(window, &values)?;
    }
}
