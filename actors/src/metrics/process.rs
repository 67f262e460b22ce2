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

    /// This thread's CPU time in user and in kernel mode, read from
    /// `/proc/thread-self/stat` independently of `cpu_seconds`.
    fn thread_cpu() -> (f64, f64) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("thread stat");
        let after = stat.rsplit_once(')').expect("comm").1;
        let ticks: Vec<f64> = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().expect("ticks"))
            .collect();
        (ticks[0] / 100.0, ticks[1] / 100.0)
    }

    #[test]
    fn the_cpu_counter_grows_with_the_work_done_and_no_faster_than_the_clock() {
        let mut registry = Registry::default();
        let m = ProcessMetrics::register(&mut registry);
        m.refresh();
        let (counted, mine, wall) = (m.cpu_seconds.get(), thread_cpu(), std::time::Instant::now());
        // Work until this thread alone has used 0.1 s of CPU in each mode (system calls
        // for the kernel's part).
        let mut burn = 0u64;
        loop {
            let (user, kernel) = thread_cpu();
            if user >= mine.0 + 0.1 && kernel >= mine.1 + 0.1 {
                break;
            }
            burn = (0..100_000u64).fold(burn, |a, x| a.wrapping_add(x * x));
            for _ in 0..50 {
                burn += std::fs::metadata("/proc/self").map_or(0, |m| m.len());
            }
        }
        std::hint::black_box(burn);
        m.refresh();
        let grown = m.cpu_seconds.get() - counted;
        let cores = std::thread::available_parallelism().map_or(64, |n| n.get()) as f64;
        // One 10 ms tick of slack each way for the rounding of per-thread times.
        assert!(grown >= 0.2 - 0.02, "grew {grown} s for 0.2 s of work");
        let bound = wall.elapsed().as_secs_f64() * cores + 0.02;
        assert!(grown <= bound, "grew {grown} s, more than {bound} s");
    }
}
