//! Where and when a benchmark ran: the machine (CPU model, last-level
//! cache), the commit and the UTC date, and whether a shape is a cache
//! figure rather than a memory one.

use super::*;

/// When, where and from which commit a benchmark ran: the header of the
/// tables and the top of `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunInfo {
    /// `MBQ_GIT_COMMIT` at build time, else `git rev-parse --short HEAD`
    /// of the checkout, else "unknown".
    pub commit: String,
    /// UTC, `YYYY-MM-DD HH:MM:SS UTC`.
    pub date: String,
    /// /proc/cpuinfo's model name (or "unknown").
    pub cpu: String,
    /// Logical CPUs this process may use.
    pub cores: usize,
    /// The L3 cache (/sys/devices/system/cpu/cpu0/cache/index3/size).
    pub l3_bytes: Option<u64>,
}

impl RunInfo {
    pub fn collect() -> RunInfo {
        RunInfo {
            commit: git_commit(),
            date: utc_now(),
            cpu: cpu_model(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            l3_bytes: l3_bytes(),
        }
    }

    /// One line for the top of the tables.
    pub fn header(&self) -> String {
        let l3 = self
            .l3_bytes
            .map(|b| format!(", L3 {} MiB", b >> 20))
            .unwrap_or_default();
        format!(
            "mbq {} (commit {}), {}; machine: {}, {} cores{l3}\n",
            env!("CARGO_PKG_VERSION"),
            self.commit,
            self.date,
            self.cpu,
            self.cores
        )
    }
}

/// The commit this binary was built from: `MBQ_GIT_COMMIT` when the build
/// set it (scripts), else the checkout's `git rev-parse --short HEAD` (the
/// crate's directory when it still exists, else the current one), else
/// "unknown".
pub fn git_commit() -> String {
    if let Some(c) = option_env!("MBQ_GIT_COMMIT").filter(|c| !c.is_empty()) {
        return c.to_string();
    }
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = if manifest.is_dir() {
        manifest.to_path_buf()
    } else {
        std::path::PathBuf::from(".")
    };
    std::process::Command::new("git")
        .arg("-C")
        .arg(&dir)
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Now, UTC, as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_date(secs)
}

/// Seconds since the Unix epoch as a UTC date (the proleptic Gregorian
/// calendar; Howard Hinnant's days-to-civil).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The CPU's model name from /proc/cpuinfo ("model name", or "Model" /
/// "Hardware" on some ARM kernels), else "unknown".
pub fn cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_model_of(&text).unwrap_or_else(|| "unknown".into())
}

fn cpu_model_of(cpuinfo: &str) -> Option<String> {
    ["model name", "Model", "Hardware"].iter().find_map(|key| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == *key && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    })
}

/// The L3 cache of CPU 0 in bytes, from sysfs.
pub fn l3_bytes() -> Option<u64> {
    let t = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok()?;
    parse_cache_size(&t)
}

/// "32768K" / "8M" / "1024" -> bytes.
pub fn parse_cache_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

/// Why a GEMV row's GB/s is not a memory bandwidth, if it is not:
/// [`CacheNote::Cache`] when the rotated weights are under twice the
/// last-level cache, [`CacheNote::AboveCopy`] when it beats the
/// device-to-device copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheNote {
    Cache,
    AboveCopy,
}

impl CacheNote {
    pub fn text(self) -> &'static str {
        match self {
            CacheNote::Cache => "weights fit in the last-level cache",
            CacheNote::AboveCopy => "faster than the device-to-device copy",
        }
    }
}

pub fn cache_note(
    r: &GemvResult,
    cache_bytes: Option<u64>,
    copy: &Option<CopyResult>,
) -> Option<CacheNote> {
    if cache_bytes.is_some_and(|c| r.rotated_bytes < 2.0 * c as f64) {
        return Some(CacheNote::Cache);
    }
    match copy {
        Some(c) if c.gb_s > 0.0 && r.gb_s > c.gb_s => Some(CacheNote::AboveCopy),
        _ => None,
    }
}

/// Notes under a backend's GEMV table: the rows whose GB/s is a cache
/// figure, not a memory one (see [`cache_note`]).
pub fn gemv_notes(m: &Measured<GemvResult>) -> String {
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut s = String::new();
    let list = |note: CacheNote| -> Vec<String> {
        m.rows
            .iter()
            .filter(|r| cache_note(r, m.cache_bytes, &m.copy) == Some(note))
            .map(|r| {
                format!(
                    "{}x{} {} ({:.1} MiB)",
                    r.inp,
                    r.out,
                    r.weights,
                    mib(r.rotated_bytes)
                )
            })
            .collect()
    };
    let cached = list(CacheNote::Cache);
    if let (false, Some(c)) = (cached.is_empty(), m.cache_bytes) {
        s += &format!(
            "note: under 2x the L3 cache ({} MiB) with their rotated copies, so the GB/s is a cache figure, not a memory one: {}\n",
            c >> 20,
            cached.join(", ")
        );
    }
    let above = list(CacheNote::AboveCopy);
    if !above.is_empty() {
        s += &format!(
            "note: above the device-to-device copy bandwidth, so served from a cache, not memory: {}\n",
            above.join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_cache_sizes() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(951_782_400 + 3661), "2000-02-29 01:01:01 UTC");
        assert_eq!(utc_date(1_764_700_000), "2025-12-02 18:26:40 UTC");
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("8M"), Some(8 << 20));
        assert_eq!(parse_cache_size("x"), None);
    }

    #[test]
    fn cpu_model_from_cpuinfo() {
        let t = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(
            cpu_model_of(t).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(cpu_model_of("processor : 0\n"), None);
    }

    #[test]
    fn min_median_max_of_reps() {
        assert_eq!(min_median_max(vec![3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(dense_label(4.0), "f32");
        assert_eq!(dense_label(2.0), "f16");
    }
}
