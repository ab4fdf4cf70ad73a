//! The tables `mbq bench` prints: per backend, and backends side by side
//! with each one's copy bandwidth and the notes on cache-resident shapes.

use super::*;

/// The GEMV table for one backend, as text.
pub fn gemv_table(backend: &str, rows: &[GemvResult]) -> String {
    let timing = timing_of(rows.iter().map(|r| r.timing));
    let mut s = format!(
        "GEMV on {backend} ({timing} per launch, min / median / max of the repetitions; batch 1; GB/s at the median)\n{:>12} {:>7} {:>10} {:>10} {:>10} {:>9} {:>8} {:>10}\n",
        "in x out", "weights", "min (us)", "median", "max", "GB/s", "vs dense", "wall (us)"
    );
    for r in rows {
        s += &format!(
            "{:>12} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>9.2} {:>7.2}x {:>10.1}\n",
            format!("{}x{}", r.inp, r.out),
            r.weights,
            r.min_us,
            r.median_us,
            r.max_us,
            r.gb_s,
            r.speedup_vs_f16,
            r.wall_us
        );
    }
    s
}

/// The timing of a table's rows: theirs when all agree, else "mixed".
pub fn timing_of<'a>(mut t: impl Iterator<Item = &'a str>) -> &'a str {
    match t.next() {
        None => WALL_CLOCK,
        Some(first) => {
            if t.all(|x| x == first) {
                first
            } else {
                "mixed gpu timestamps and wall clock"
            }
        }
    }
}

/// A "vs dense" ratio; "-" where no dense row was run to compare with.
fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "-".to_string()
    }
}

/// The decode table for one backend, as text.
pub fn decode_table(backend: &str, model: &str, rows: &[DecodeResult]) -> String {
    let timing = timing_of(rows.iter().map(|r| r.timing));
    let mut s = format!(
        "Decode on {backend}: {model} (end to end per token after prefill: mean, and min / median / max step; device column: {timing})\n{:>7} {:>7} {:>8} {:>12} {:>26} {:>9} {:>8} {:>14}\n",
        "weights", "layers", "tokens", "ms/token", "min / median / max ms", "tok/s", "vs dense", "device ms/tok"
    );
    for r in rows {
        let device = r
            .device_ms_per_token
            .map_or("-".to_string(), |d| format!("{d:.2}"));
        s += &format!(
            "{:>7} {:>7} {:>8} {:>12.2} {:>26} {:>9.2} {:>8} {:>14}\n",
            r.weights,
            r.layers,
            r.tokens,
            r.ms_per_token,
            format!(
                "{:.2} / {:.2} / {:.2}",
                r.min_ms_per_token, r.median_ms_per_token, r.max_ms_per_token
            ),
            r.tok_s,
            ratio(r.speedup_vs_f16),
            device
        );
    }
    s
}

/// One backend's GEMV or decode results with its copy bandwidth.
pub struct Measured<T> {
    pub backend: String,
    /// The device in full: the CPU model, the wgpu adapter with its
    /// backend and driver, the CUDA device.
    pub device: String,
    /// The last-level cache the weights stream through, when it is the
    /// host's (the CPU backend, a CPU wgpu adapter such as lavapipe).
    pub cache_bytes: Option<u64>,
    pub copy: Option<CopyResult>,
    pub rows: Vec<T>,
}

fn pct(gb_s: f64, copy: &Option<CopyResult>) -> String {
    match copy {
        Some(c) if c.gb_s > 0.0 => format!("{:.0}%", 100.0 * gb_s / c.gb_s),
        _ => "-".into(),
    }
}

/// A backend's short name for a column header ("wgpu (adapter)" -> "wgpu").
fn short(b: &str) -> &str {
    b.split(" (").next().unwrap_or(b)
}

fn copy_line(ms: &[(&str, &Option<CopyResult>)]) -> String {
    let parts: Vec<String> = ms
        .iter()
        .map(|(b, c)| match c {
            Some(c) => format!(
                "{b} {:.1} GB/s ({} MiB, {}; min / median / max {:.0} / {:.0} / {:.0} us)",
                c.gb_s,
                c.bytes >> 20,
                c.timing,
                c.min_us,
                c.median_us,
                c.max_us
            ),
            None => format!("{b} -"),
        })
        .collect();
    format!(
        "device-to-device copy (read + write): {}\n",
        parts.join("; ")
    )
}

/// A side-by-side row's weights: the backends' common label, or the
/// kind's (`dense`) when they differ (the CPU's dense is f32, a GPU's f16).
fn row_label<'a>(mut labels: impl Iterator<Item = &'a str>, kind: WeightKind) -> &'a str {
    let first = labels.next().unwrap_or(kind.label());
    if labels.all(|l| l == first) {
        first
    } else {
        kind.label()
    }
}

/// Under a side-by-side table whose backends store dense weights
/// differently: what `dense` is on each.
fn dense_footnote<'a, I>(ms: impl Iterator<Item = (&'a str, I)>) -> String
where
    I: Iterator<Item = (WeightKind, &'static str)>,
{
    let mut each = Vec::new();
    for (b, mut rows) in ms {
        if let Some((_, l)) = rows.find(|(k, _)| *k == WeightKind::F16) {
            each.push((short(b).to_string(), l));
        }
    }
    if each.windows(2).all(|w| w[0].1 == w[1].1) {
        return String::new();
    }
    let parts: Vec<String> = each.iter().map(|(b, l)| format!("{b} {l}")).collect();
    format!("dense weights: {}\n", parts.join(", "))
}

/// The GEMV results of several backends side by side: per shape and
/// format, each backend's time, achieved GB/s of weight bytes, its fraction
/// of the backend's copy bandwidth, and the speedup over its dense GEMV.
pub fn gemv_side_by_side(ms: &[Measured<GemvResult>]) -> String {
    let mut s = copy_line(
        &ms.iter()
            .map(|m| (m.backend.as_str(), &m.copy))
            .collect::<Vec<_>>(),
    );
    s += &format!("{:>12} {:>7}", "in x out", "weights");
    for m in ms {
        s += &format!(" | {:>31}", short(&m.backend));
    }
    s += "\n";
    s += &format!("{:>12} {:>7}", "", "");
    for _ in ms {
        s += &format!(" | {:>8} {:>7} {:>5} {:>8}", "us", "GB/s", "bw", "vs dense");
    }
    s += "\n";
    let n = ms.iter().map(|m| m.rows.len()).max().unwrap_or(0);
    for i in 0..n {
        let Some(r0) = ms.iter().find_map(|m| m.rows.get(i)) else {
            continue;
        };
        let label = row_label(
            ms.iter().filter_map(|m| m.rows.get(i).map(|r| r.weights)),
            r0.kind,
        );
        s += &format!("{:>12} {:>7}", format!("{}x{}", r0.inp, r0.out), label);
        for m in ms {
            match m.rows.get(i) {
                Some(r) => {
                    s += &format!(
                        " | {:>8.1} {:>7.1} {:>5} {:>7.2}x",
                        r.median_us,
                        r.gb_s,
                        pct(r.gb_s, &m.copy),
                        r.speedup_vs_f16
                    )
                }
                None => s += &format!(" | {:>31}", "-"),
            }
        }
        s += "\n";
    }
    s += &dense_footnote(ms.iter().map(|m| {
        (
            m.backend.as_str(),
            m.rows.iter().map(|r| (r.kind, r.weights)),
        )
    }));
    s
}

/// The decode results of several backends side by side: tok/s, ms/token,
/// speedup over dense and the weight bandwidth achieved (weight bytes per
/// token / time) as a fraction of the copy bandwidth.
pub fn decode_side_by_side(model: &str, ms: &[Measured<DecodeResult>]) -> String {
    let mut s = format!("Decode: {model} (wall clock per token after prefill)\n");
    s += &copy_line(
        &ms.iter()
            .map(|m| (m.backend.as_str(), &m.copy))
            .collect::<Vec<_>>(),
    );
    s += &format!("{:>7}", "weights");
    for m in ms {
        s += &format!(" | {:>35}", short(&m.backend));
    }
    s += "\n";
    s += &format!("{:>7}", "");
    for _ in ms {
        s += &format!(
            " | {:>8} {:>8} {:>8} {:>7}",
            "tok/s", "ms/tok", "vs dense", "bw"
        );
    }
    s += "\n";
    let n = ms.iter().map(|m| m.rows.len()).max().unwrap_or(0);
    for i in 0..n {
        let Some(r0) = ms.iter().find_map(|m| m.rows.get(i)) else {
            continue;
        };
        let label = row_label(
            ms.iter().filter_map(|m| m.rows.get(i).map(|r| r.weights)),
            r0.kind,
        );
        s += &format!("{:>7}", label);
        for m in ms {
            match m.rows.get(i) {
                Some(r) => {
                    let gb_s = r.weight_bytes_per_token / (r.ms_per_token * 1e-3) / 1e9;
                    s += &format!(
                        " | {:>8.1} {:>8.2} {:>8} {:>7}",
                        r.tok_s,
                        r.ms_per_token,
                        ratio(r.speedup_vs_f16),
                        pct(gb_s, &m.copy)
                    )
                }
                None => s += &format!(" | {:>35}", "-"),
            }
        }
        s += "\n";
    }
    s += &dense_footnote(ms.iter().map(|m| {
        (
            m.backend.as_str(),
            m.rows.iter().map(|r| (r.kind, r.weights)),
        )
    }));
    s
}
