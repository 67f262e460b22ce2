//! Process metrics (CPU, memory, file descriptors, start time), read from `/proc` at
//! each scrape, so dashboards can chart CPU and memory per pod from the service's own
//! exposition. Elsewhere than Linux they stay at zero.

use super::register;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

/// Clock ticks per second in `/proc/self/stat`: USER_HZ, 100 on every mainstream Linux
/// architecture (reading it properly needs `sysconf`, i.e. unsafe FFI).
const TICKS_PER_SECOND: f64 = 100.0;

/// Handles of the process families.
#[derive(Debug, Clone, Default)]
pub struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

impl ProcessMetrics {
    /// Registers the families; the start time is now.
    pub fn register(registry: &mut Registry) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let r = registry;
        let m = Self {
            cpu_seconds: register(
                r,
                "process_cpu_seconds",
                "User and system CPU time spent",
                Counter::default(),
            ),
            resident_bytes: register(
                r,
                "process_resident_memory_bytes",
                "Resident memory size",
                Gauge::default(),
            ),
            open_fds: register(
                r,
                "process_open_fds",
                "Open file descriptors",
                Gauge::default(),
            ),
            start_time: register(
                r,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch",
                Gauge::default(),
            ),
        };
        m.start_time.set(now);
        m
    }

    /// Reads `/proc/self` into the families.
    pub fn refresh(&self) {
        if let Some(seconds) = cpu_seconds() {
            let delta = seconds - self.cpu_seconds.get();
            if delta > 0.0 {
                self.cpu_seconds.inc_by(delta);
            }
        }
        if let Some(bytes) = resident_bytes() {
            self.resident_bytes.set(bytes);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
    }
}

fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; fields are counted after its closing paren.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let mut registry = Registry::default();
        let m = ProcessMetrics::register(&mut registry);
        // CPU time advances in 10 ms ticks: work until one has passed.
        let started = std::time::Instant::now();
        let mut burn = 0u64;
        while m.cpu_seconds.get() == 0.0 && started.elapsed() < std::time::Duration::from_secs(10) {
            burn = (0..1_000_000u64).fold(burn, |a, x| a.wrapping_add(x * x));
            m.refresh();
        }
        // Keep the work from being optimised away.
        std::hint::black_box(burn);
        assert!(m.resident_bytes.get() > 1024 * 1024);
        assert!(m.open_fds.get() >= 3);
        assert!(m.cpu_seconds.get() > 0.0);
        // The counter is the process's CPU time, not a sum of readings.
        let before = cpu_seconds().expect("cpu time");
        m.refresh();
        let after = cpu_seconds().expect("cpu time");
        let counted = m.cpu_seconds.get();
        assert!(
            before <= counted && counted <= after,
            "{before} <= {counted} <= {after}"
        );
        assert!(m.start_time.get() > 1.6e9);
    }
}
