//! What the benchmark reads about a server process: resident memory and
//! CPU time, from /proc.

use anyhow::Context;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Resident set size of `pid`, in bytes.
///
/// # Errors
/// When /proc/PID/status cannot be read.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

/// User plus system CPU time of `pid` so far, in seconds.
///
/// # Errors
/// When /proc/PID/stat cannot be read.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    let utime: f64 = fields
        .get(11)
        .and_then(|f| f.parse().ok())
        .context("utime")?;
    let stime: f64 = fields
        .get(12)
        .and_then(|f| f.parse().ok())
        .context("stime")?;
    Ok((utime + stime) / TICKS_PER_SECOND)
}

/// CPU time of this process, in seconds.
///
/// # Errors
/// When /proc/self/stat cannot be read.
pub fn own_cpu_seconds() -> anyhow::Result<f64> {
    cpu_seconds(std::process::id())
}

/// Raise this process's open-file limit as far as allowed.
pub fn raise_file_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}
