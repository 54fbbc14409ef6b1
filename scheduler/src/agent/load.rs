//! What this host's machine is doing, for its status (R13): how busy its CPUs were since
//! the last sample, how much memory is in use, and the kernel's pressure stall figures
//! (PSI: the share of the last 10 s some task waited for CPU or memory). Read from
//! `/proc`; a figure the machine does not offer (no PSI) stays zero.

use std::time::{Duration, Instant};

use crate::bus::HostLoad;

/// The machine is read at most this often: statuses in between (they go out on every
/// start and end of an execution) carry the last figures, and a CPU busy share over a
/// shorter span would be noise.
const MIN_SPAN: Duration = Duration::from_millis(500);

/// CPU time counters of `/proc/stat`'s first line: (busy, total) in clock ticks.
pub(super) fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is in user already).
    if fields.len() < 4 {
        return None;
    }
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// (total, used) bytes from `/proc/meminfo`: used is what is not available.
pub(super) fn memory(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let total = field("MemTotal:")? * 1024;
    let available = field("MemAvailable:")? * 1024;
    Some((total, total.saturating_sub(available)))
}

/// The `some avg10` percentage of a `/proc/pressure/*` file.
pub(super) fn pressure_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let v: f64 = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()?;
    v.is_finite().then_some(v.clamp(0.0, 100.0))
}

/// Samples the machine at most every [`MIN_SPAN`]; keeps the previous CPU counters to
/// turn them into a busy share.
#[derive(Debug, Default)]
pub(super) struct LoadSampler {
    /// When the machine was last read, and the CPU counters then.
    last: Option<(Instant, u64, u64)>,
    load: HostLoad,
}

impl LoadSampler {
    pub(super) fn sample(&mut self) -> HostLoad {
        let now = Instant::now();
        if self.last.is_some_and(|(at, _, _)| now - at < MIN_SPAN) {
            return self.load.clone();
        }
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        if let Some((busy, total)) = cpu_ticks(&read("/proc/stat")) {
            if let Some((_, b0, t0)) = self.last {
                if total > t0 {
                    self.load.cpu_busy =
                        (busy.saturating_sub(b0) as f64 / (total - t0) as f64).clamp(0.0, 1.0);
                }
            }
            self.last = Some((now, busy, total));
        }
        (self.load.memory_total_bytes, self.load.memory_used_bytes) =
            memory(&read("/proc/meminfo")).unwrap_or_default();
        self.load.cpu_pressure = pressure_avg10(&read("/proc/pressure/cpu")).unwrap_or(0.0);
        self.load.memory_pressure = pressure_avg10(&read("/proc/pressure/memory")).unwrap_or(0.0);
        self.load.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        assert_eq!(cpu_ticks(stat), Some((160, 1000)));
        assert_eq!(cpu_ticks("cpu0 1 2 3 4\n"), None);
        assert_eq!(cpu_ticks("cpu  1 x 3 4\n"), None);
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   18000000 kB\n";
        assert_eq!(memory(meminfo), Some((24_000_000 * 1024, 6_000_000 * 1024)));
        assert_eq!(memory("MemTotal: 5 kB\n"), None);
        let psi = "some avg10=7.62 avg60=5.21 avg300=4.51 total=1325506768\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(pressure_avg10(psi), Some(7.62));
        assert_eq!(pressure_avg10(""), None);
    }

    #[test]
    fn this_machine_samples_sanely() {
        let mut s = LoadSampler::default();
        let first = s.sample();
        assert!(first.memory_total_bytes > 0);
        assert!(first.memory_used_bytes <= first.memory_total_bytes);
        std::thread::sleep(MIN_SPAN + Duration::from_millis(20));
        let second = s.sample();
        assert!((0.0..=1.0).contains(&second.cpu_busy), "{second:?}");
        assert!((0.0..=100.0).contains(&second.cpu_pressure));
    }
}
