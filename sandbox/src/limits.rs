//! Resource limits of one execution, and the parsers for the human forms used on the
//! command line (`256M`, `0.5`, `10s`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The cgroup limits of one sandbox. `None` means unlimited — which must be asked for:
/// the default ([`Limits::default`]) is finite, so a caller that forgets to set limits
/// gets a bounded sandbox, not an unbounded one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory limit in bytes, swap excluded (a sandbox never swaps).
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in cores (0.5 = half a core), enforced as a CFS quota.
    pub cpus: Option<f64>,
    /// Maximum number of tasks (processes and threads), the sandbox's init included.
    pub pids: Option<u64>,
}

/// Memory of a sandbox when nobody said otherwise.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Processes and threads of a sandbox when nobody said otherwise.
pub const DEFAULT_PIDS: u64 = 128;
/// Wall-clock limit of a run or an execution when nobody said otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for Limits {
    /// Finite: [`DEFAULT_MEMORY`], [`DEFAULT_PIDS`] and one CPU.
    fn default() -> Self {
        Limits {
            memory_bytes: Some(DEFAULT_MEMORY),
            cpus: Some(1.0),
            pids: Some(DEFAULT_PIDS),
        }
    }
}

impl Limits {
    /// No limit at all (for trusted helpers that are bounded otherwise).
    pub const UNLIMITED: Limits = Limits {
        memory_bytes: None,
        cpus: None,
        pids: None,
    };
}

/// Words that mean "no limit" on the command line.
fn is_unlimited(t: &str) -> bool {
    matches!(
        t.trim().to_ascii_lowercase().as_str(),
        "unlimited" | "none" | "max"
    )
}

/// A size, or `unlimited` (also `none`, `max`) for no limit.
pub fn parse_size_or_unlimited(text: &str) -> Result<Option<u64>, ParseError> {
    if is_unlimited(text) {
        return Ok(None);
    }
    parse_size(text).map(Some)
}

/// A duration, or `none` (also `unlimited`, `max`) for no limit.
pub fn parse_duration_or_none(text: &str) -> Result<Option<Duration>, ParseError> {
    if is_unlimited(text) {
        return Ok(None);
    }
    parse_duration(text).map(Some)
}

/// A count of at least 1, or `unlimited` (also `none`, `max`).
pub fn parse_count_or_unlimited(text: &str) -> Result<Option<u64>, ParseError> {
    if is_unlimited(text) {
        return Ok(None);
    }
    match text.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(ParseError::Count(text.to_string())),
    }
}

/// A CPU count, or `unlimited` (also `none`, `max`).
pub fn parse_cpus_or_unlimited(text: &str) -> Result<Option<f64>, ParseError> {
    if is_unlimited(text) {
        return Ok(None);
    }
    parse_cpus(text).map(Some)
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("invalid count {0:?}: expected a whole number of at least 1, or `unlimited`")]
    Count(String),
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
    Size(String),
    #[error("invalid duration {0:?}: expected a number with an optional ms, s, m or h suffix")]
    Duration(String),
    #[error("invalid cpu count {0:?}: expected a positive number such as 0.5 or 2")]
    Cpus(String),
}

/// Parses `512`, `64k`, `256M`, `1.5G`, `2T` (binary multiples; `MiB`/`MB` spellings too).
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let err = || ParseError::Size(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(err()),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// Parses `500ms`, `10s`, `10` (seconds), `1.5m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    let err = || ParseError::Duration(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

/// Parses a positive, finite CPU count.
pub fn parse_cpus(text: &str) -> Result<f64, ParseError> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 4096.0 => Ok(v),
        _ => Err(ParseError::Cpus(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn defaults_are_finite_and_unlimited_is_explicit() {
        let d = Limits::default();
        assert!(d.memory_bytes.is_some() && d.pids.is_some() && d.cpus.is_some());
        assert_eq!(parse_size_or_unlimited("unlimited").unwrap(), None);
        assert_eq!(parse_size_or_unlimited("1G").unwrap(), Some(1 << 30));
        assert_eq!(parse_duration_or_none("none").unwrap(), None);
        assert_eq!(parse_count_or_unlimited("max").unwrap(), None);
        assert_eq!(parse_count_or_unlimited("7").unwrap(), Some(7));
        assert!(parse_count_or_unlimited("0").is_err());
        assert!(parse_size_or_unlimited("lots").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5").unwrap(), 0.5);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("NaN").is_err());
    }
}
