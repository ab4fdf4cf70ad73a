//! The calibration report as an SVG chart (for a person): per layer the
//! measured gradients, the vision/caption ratios and the chosen alphas.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use super::report::{CalibReport, LayerGrad, Ratio};
use crate::error::{Error, Result};

/// Writes [`to_svg`] to a file.
pub fn write_svg(r: &CalibReport, path: &Path) -> Result<()> {
    std::fs::write(path, to_svg(r)).map_err(|e| Error::io(path, e))
}

// ---------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------

const WIDTH: f64 = 960.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const PANEL_H: f64 = 220.0;
const PANEL_GAP: f64 = 80.0;
const GROUP_NAMES: [&str; 4] = ["attn_in", "attn_out", "mlp_in", "mlp_out"];
const GROUP_COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// XML text and attribute escaping.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn setting_str(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

struct Series {
    /// Stable id (the `data-series` attribute of its points).
    id: String,
    label: String,
    color: &'static str,
    dashed: bool,
    /// (layer index, value).
    points: Vec<(usize, f64)>,
}

enum YScale {
    /// Decades 10^lo ..= 10^hi; values <= 0 sit on the floor. With
    /// `zero_floor` the floor is one decade below the smallest positive
    /// value and labelled 0, so that zeros do not read as a small value.
    Log {
        lo: i32,
        hi: i32,
        zero_floor: bool,
    },
    Linear {
        min: f64,
        max: f64,
        ticks: Vec<f64>,
    },
}

impl YScale {
    /// 0 (bottom) ..= 1 (top).
    fn frac(&self, v: f64) -> f64 {
        match *self {
            YScale::Log { lo, hi, .. } => {
                if v <= 0.0 {
                    0.0
                } else {
                    ((v.log10() - lo as f64) / (hi - lo) as f64).clamp(0.0, 1.0)
                }
            }
            YScale::Linear { min, max, .. } => ((v - min) / (max - min)).clamp(0.0, 1.0),
        }
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        match self {
            YScale::Log { lo, hi, zero_floor } => {
                let step = ((hi - lo) as usize).div_ceil(8).max(1);
                (*lo..=*hi)
                    .step_by(step)
                    .map(|e| {
                        let label = if *zero_floor && e == *lo {
                            "0".to_string()
                        } else {
                            format!("1e{e}")
                        };
                        (10f64.powi(e), label)
                    })
                    .collect()
            }
            YScale::Linear { ticks, .. } => ticks.iter().map(|&t| (t, fmt_tick(t))).collect(),
        }
    }

    fn log_for(values: impl Iterator<Item = f64>) -> YScale {
        let (mut min, mut max, mut zero) = (f64::INFINITY, 0.0f64, false);
        for v in values.filter(|v| v.is_finite()) {
            if v > 0.0 {
                min = min.min(v);
                max = max.max(v);
            } else {
                zero = true;
            }
        }
        let (lo, hi) = if min.is_finite() {
            let lo = min.log10().floor() as i32;
            (lo, (max.log10().ceil() as i32).max(lo + 1))
        } else {
            (-1, 0)
        };
        YScale::Log {
            lo: if zero { lo - 1 } else { lo },
            hi,
            zero_floor: zero,
        }
    }

    /// 0 .. a round number above the largest value.
    fn linear_from_zero(values: impl Iterator<Item = f64>) -> YScale {
        let max = values.filter(|v| v.is_finite()).fold(0.0f64, f64::max);
        let top = if max <= 0.0 {
            1.0
        } else {
            let p = 10f64.powf(max.log10().floor());
            [1.0, 2.0, 2.5, 5.0, 10.0]
                .iter()
                .map(|m| m * p)
                .find(|&t| t >= max)
                .unwrap_or(10.0 * p)
        };
        let ticks = (0..=4).map(|i| top * i as f64 / 4.0).collect();
        YScale::Linear {
            min: 0.0,
            max: top,
            ticks,
        }
    }
}

fn fmt_tick(t: f64) -> String {
    if t == 0.0 {
        "0".into()
    } else if t.abs() >= 1e4 || t.abs() < 1e-3 {
        format!("{t:.1e}")
    } else {
        let s = format!("{t:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn fmt_value(v: f64, log: bool) -> String {
    if log {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// Horizontal layout shared by every panel.
struct XAxis {
    min: usize,
    max: usize,
    labels: Vec<usize>,
}

impl XAxis {
    fn new(layers: &[usize]) -> XAxis {
        let set: BTreeSet<usize> = layers.iter().copied().collect();
        let all: Vec<usize> = set.into_iter().collect();
        let step = all.len().div_ceil(24).max(1);
        let mut labels: Vec<usize> = all.iter().copied().step_by(step).collect();
        if let Some(&last) = all.last() {
            if labels.last() != Some(&last) {
                // The last layer replaces the label just before it (closer
                // than a step).
                if labels.len() > 1 {
                    labels.pop();
                }
                labels.push(last);
            }
        }
        XAxis {
            min: all.first().copied().unwrap_or(0),
            max: all.last().copied().unwrap_or(0),
            labels,
        }
    }

    fn x(&self, layer: usize) -> f64 {
        let w = WIDTH - LEFT - RIGHT;
        if self.max == self.min {
            LEFT + w / 2.0
        } else {
            // Half a step of padding on each side.
            let n = (self.max - self.min) as f64;
            let pad = w / (2.0 * (n + 1.0));
            LEFT + pad + (layer - self.min) as f64 / n * (w - 2.0 * pad)
        }
    }
}

/// What one chart panel shows.
struct Panel<'a> {
    title: &'a str,
    y_label: &'a str,
    scale: YScale,
    series: &'a [Series],
    /// Lines under the legend.
    notes: Vec<String>,
}

/// Draws a panel with its frame, axes, legend and series, `top` being the
/// y of the plot area's top edge.
fn panel(out: &mut String, top: f64, xa: &XAxis, p: &Panel) {
    let Panel {
        title,
        y_label,
        ref scale,
        series,
        ref notes,
    } = *p;
    let log = matches!(scale, YScale::Log { .. });
    let plot_w = WIDTH - LEFT - RIGHT;
    let bottom = top + PANEL_H;
    let y = |v: f64| bottom - scale.frac(v) * PANEL_H;
    let _ = writeln!(out, "<g class=\"panel\">");
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        top - 10.0,
        esc(title)
    );
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{top:.1}\" width=\"{plot_w:.1}\" height=\"{PANEL_H:.1}\" fill=\"none\" stroke=\"#888\"/>"
    );
    // Y ticks and grid.
    for (v, label) in scale.ticks() {
        let ty = y(v);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{ty:.1}\" x2=\"{:.1}\" y2=\"{ty:.1}\" stroke=\"#e4e4e4\"/>",
            LEFT + plot_w
        );
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            ty + 4.0,
            esc(&label)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">{}</text>",
        top + PANEL_H / 2.0,
        top + PANEL_H / 2.0,
        esc(y_label)
    );
    // X ticks (layer index).
    for &l in &xa.labels {
        let tx = xa.x(l);
        let _ = writeln!(
            out,
            "<line x1=\"{tx:.1}\" y1=\"{bottom:.1}\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>",
            bottom + 4.0
        );
        let _ = writeln!(
            out,
            "<text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{l}</text>",
            bottom + 16.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">layer</text>",
        LEFT + plot_w / 2.0,
        bottom + 32.0
    );
    // Series: a line through the finite points, a marker per point.
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(l, v)| (xa.x(l), y(v)))
            .collect();
        let dash = if s.dashed {
            " stroke-dasharray=\"6 3\""
        } else {
            ""
        };
        if pts.len() > 1 {
            let coords: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{dash}/>",
                coords.join(" "),
                s.color
            );
        }
        for &(l, v) in s.points.iter().filter(|p| p.1.is_finite()) {
            let floor = log && v <= 0.0;
            let tip = format!(
                "layer {l}, {}: {}{}",
                s.label,
                fmt_value(v, log),
                if floor {
                    " (drawn at the axis floor)"
                } else {
                    ""
                }
            );
            let fill = if s.dashed || floor { "white" } else { s.color };
            let _ = writeln!(
                out,
                "<circle class=\"pt\" data-series=\"{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{fill}\" stroke=\"{}\"><title>{}</title></circle>",
                esc(&s.id),
                xa.x(l),
                y(v),
                s.color,
                esc(&tip)
            );
        }
    }
    // Legend on the right.
    let lx = LEFT + plot_w + 16.0;
    for (i, s) in series.iter().enumerate() {
        let ly = top + 12.0 + 18.0 * i as f64;
        let dash = if s.dashed {
            " stroke-dasharray=\"6 3\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>",
            lx + 24.0,
            s.color
        );
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            lx + 30.0,
            ly + 4.0,
            esc(&s.label)
        );
    }
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(
            out,
            "<text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#555\">{}</text>",
            top + 12.0 + 18.0 * (series.len() as f64 + 0.5) + 14.0 * i as f64,
            esc(n)
        );
    }
    let _ = writeln!(out, "</g>");
}

/// The report as a standalone SVG: per layer, (1) mean |grad| of vision and
/// caption tokens at o_proj (attn) and down_proj (mlp) on a log axis, (2)
/// the ratio vision/caption weight used for attn and mlp, (3) the chosen
/// alpha per group. Panels 1-2 are left out (with a note) when the report
/// has no gradients. On the log axis, zeros are drawn at the floor (then a
/// decade below the smallest positive value, labelled 0) with an open
/// marker; non-finite values are not drawn.
pub fn to_svg(r: &CalibReport) -> String {
    let get = |k: &str| r.settings.get(k).map(setting_str);
    let mut title = String::from("MBQ calibration");
    for k in ["method", "w_bit", "a_bit", "model"] {
        if let Some(v) = get(k) {
            let _ = write!(title, "  {k}={v}");
        }
    }
    let mut rest: Vec<String> = r
        .settings
        .iter()
        .filter(|(k, _)| !["method", "w_bit", "a_bit", "model"].contains(&k.as_str()))
        .filter(|(_, v)| !v.is_array() && !v.is_object())
        .map(|(k, v)| format!("{k}={}", setting_str(v)))
        .collect();
    let mut subtitle = String::new();
    for s in rest.drain(..) {
        if subtitle.len() + s.len() > 140 {
            subtitle.push_str("  ...");
            break;
        }
        if !subtitle.is_empty() {
            subtitle.push_str("  ");
        }
        subtitle.push_str(&s);
    }

    let layer_ids: Vec<usize> = r.layers.iter().map(|l| l.index).collect();
    let xa = XAxis::new(&layer_ids);
    let has_grad = r.layers.iter().any(|l| l.grad.is_some());
    let has_ratio = r.layers.iter().any(|l| l.ratio.is_some());
    let has_groups = r.layers.iter().any(|l| !l.groups.is_empty());
    let mut header_notes = Vec::new();
    if r.layers.is_empty() {
        header_notes.push("The report has no layers.".to_string());
    } else {
        if !has_grad {
            header_notes.push(format!(
                "No gradient panel: this report has no sensitivity data (method {} measures none).",
                get("method").unwrap_or_else(|| "?".into())
            ));
        }
        if !has_ratio {
            header_notes.push("No ratio panel: this report has no vision/caption ratios.".into());
        }
        if !has_groups {
            header_notes.push("No alpha panel: this report has no searched groups.".into());
        }
    }
    let panels = [has_grad, has_ratio, has_groups]
        .iter()
        .filter(|&&p| p && !r.layers.is_empty())
        .count();
    let header_h = 64.0 + 16.0 * header_notes.len() as f64 + 30.0;
    let height = header_h + panels as f64 * (PANEL_H + PANEL_GAP) + 10.0;

    let mut out = String::new();
    let _ = writeln!(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" viewBox=\"0 0 {WIDTH} {height:.0}\" font-family=\"sans-serif\">"
    );
    let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"28\" font-size=\"17\" font-weight=\"bold\">{}</text>",
        esc(&title)
    );
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"48\" font-size=\"12\" fill=\"#444\">{}</text>",
        esc(&subtitle)
    );
    for (i, n) in header_notes.iter().enumerate() {
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"12\" fill=\"#a00\">{}</text>",
            68.0 + 16.0 * i as f64,
            esc(n)
        );
    }
    let mut top = header_h;
    if r.layers.is_empty() {
        let _ = writeln!(out, "</svg>");
        return out;
    }

    if has_grad {
        let grad_series = |id: &str, label: &str, color, dashed, f: fn(&LayerGrad) -> f64| Series {
            id: id.into(),
            label: label.into(),
            color,
            dashed,
            points: r
                .layers
                .iter()
                .filter_map(|l| l.grad.as_ref().map(|g| (l.index, f(g))))
                .collect(),
        };
        let series = [
            grad_series("vision_attn", "vision @ o_proj", "#1f77b4", false, |g| {
                g.attn.vision
            }),
            grad_series("caption_attn", "caption @ o_proj", "#d62728", false, |g| {
                g.attn.caption
            }),
            grad_series("vision_mlp", "vision @ down_proj", "#1f77b4", true, |g| {
                g.mlp.vision
            }),
            grad_series("caption_mlp", "caption @ down_proj", "#d62728", true, |g| {
                g.mlp.caption
            }),
        ];
        let scale = YScale::log_for(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
        let mut notes = Vec::new();
        if series.iter().any(|s| s.points.iter().any(|p| p.1 <= 0.0)) {
            notes.push("0: exactly zero, drawn".into());
            notes.push("at the axis floor".into());
        }
        if series
            .iter()
            .any(|s| s.points.iter().any(|p| !p.1.is_finite()))
        {
            notes.push("non-finite values not drawn".into());
        }
        panel(
            &mut out,
            top,
            &xa,
            &Panel {
                title: "Sensitivity: mean |grad| of the loss at the layer outputs",
                y_label: "mean |grad| (log)",
                scale,
                series: &series,
                notes,
            },
        );
        top += PANEL_H + PANEL_GAP;
    }
    if has_ratio {
        let ratio_series = |id: &str, label: &str, color, dashed, f: fn(&Ratio) -> f64| Series {
            id: id.into(),
            label: label.into(),
            color,
            dashed,
            points: r
                .layers
                .iter()
                .filter_map(|l| l.ratio.as_ref().map(|x| (l.index, f(x))))
                .collect(),
        };
        let series = [
            ratio_series("ratio_attn", "attn (qkv, o)", "#2ca02c", false, |x| x.attn),
            ratio_series("ratio_mlp", "mlp (gate/up, down)", "#9467bd", true, |x| {
                x.mlp
            }),
        ];
        let scale =
            YScale::linear_from_zero(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
        panel(
            &mut out,
            top,
            &xa,
            &Panel {
                title: "Vision weight in the loss: ratio g_vision / g_caption (median-clamped)",
                y_label: "ratio",
                scale,
                series: &series,
                notes: Vec::new(),
            },
        );
        top += PANEL_H + PANEL_GAP;
    }
    if has_groups {
        let mut names: Vec<String> = GROUP_NAMES.iter().map(|s| s.to_string()).collect();
        for l in &r.layers {
            for g in &l.groups {
                if !names.contains(&g.name) {
                    names.push(g.name.clone());
                }
            }
        }
        let series: Vec<Series> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Series {
                id: format!("alpha_{name}"),
                label: name.clone(),
                color: GROUP_COLORS[i % GROUP_COLORS.len()],
                dashed: false,
                points: r
                    .layers
                    .iter()
                    .filter_map(|l| {
                        l.groups
                            .iter()
                            .find(|g| &g.name == name)
                            .map(|g| (l.index, g.alpha))
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        let scale = YScale::Linear {
            min: 0.0,
            max: 1.0,
            ticks: vec![0.0, 0.25, 0.5, 0.75, 1.0],
        };
        panel(
            &mut out,
            top,
            &xa,
            &Panel {
                title: "Chosen scale exponent alpha per group",
                y_label: "alpha",
                scale,
                series: &series,
                notes: Vec::new(),
            },
        );
    }
    let _ = writeln!(out, "</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::report::{read_json, write_json, GroupReport, LayerReport, ModalityGrad};
    use serde_json::{json, Value};

    fn group(name: &str, alpha: f64) -> GroupReport {
        GroupReport {
            name: name.into(),
            alpha,
            loss: 0.5 * alpha + 0.01,
            // Exact binary fractions: serde_json (without its
            // `float_roundtrip` feature) may parse a float 1 ulp off.
            losses: (0..20).map(|i| 1.0 + i as f64 / 32.0).collect(),
        }
    }

    fn report(n_layers: usize, with_grad: bool) -> CalibReport {
        let mut settings = serde_json::Map::new();
        settings.insert("method".into(), json!("mbq"));
        settings.insert("w_bit".into(), json!(3));
        settings.insert("a_bit".into(), json!(16));
        settings.insert("model".into(), json!("models/a<b&c"));
        settings.insert("n_samples".into(), json!(128));
        let layers = (0..n_layers)
            .map(|i| {
                let last = i + 1 == n_layers;
                LayerReport {
                    index: i,
                    grad: with_grad.then(|| LayerGrad {
                        attn: ModalityGrad {
                            vision: if last { 0.0 } else { 1e-8 * (i + 1) as f64 },
                            caption: 2e-7 * (i + 1) as f64,
                        },
                        mlp: ModalityGrad {
                            vision: if last { 0.0 } else { 3e-8 },
                            caption: 1e-6,
                        },
                    }),
                    ratio: with_grad.then_some(Ratio {
                        attn: 0.05 + 0.01 * i as f64,
                        mlp: 0.1,
                    }),
                    groups: GROUP_NAMES
                        .iter()
                        .enumerate()
                        .map(|(k, n)| group(n, 0.05 * (i + k) as f64 % 1.0))
                        .collect(),
                }
            })
            .collect();
        CalibReport { settings, layers }
    }

    /// A tiny XML well-formedness check: balanced, properly nested tags,
    /// quoted attributes, and only the five predefined entities.
    fn check_xml(s: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = s;
        let mut roots = 0;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            check_entities(text);
            assert!(!text.contains('>'), "stray '>' in text {text:?}");
            rest = &rest[i..];
            if rest.starts_with("<?") {
                let end = rest.find("?>").expect("unterminated <?");
                rest = &rest[end + 2..];
                continue;
            }
            if rest.starts_with("<!--") {
                let end = rest.find("-->").expect("unterminated comment");
                rest = &rest[end + 3..];
                continue;
            }
            let end = rest.find('>').expect("unterminated tag");
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            assert!(!tag.contains('<'), "'<' inside tag {tag:?}");
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack
                    .pop()
                    .unwrap_or_else(|| panic!("</{name}> closes nothing"));
                assert_eq!(open, name.trim(), "mismatched tags");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body
                .split_whitespace()
                .next()
                .expect("empty tag")
                .to_string();
            // Attributes: name="value" pairs with an even number of quotes.
            assert_eq!(
                body.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            check_entities(body);
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name);
            }
        }
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert!(stack.is_empty(), "unclosed tags {stack:?}");
        assert_eq!(roots, 1, "one root element");
    }

    fn check_entities(s: &str) {
        for (i, _) in s.match_indices('&') {
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| s[i..].starts_with(e));
            assert!(ok, "bare '&' in {s:?}");
        }
    }

    /// The numeric attribute `name` of the first tag of `s`.
    fn attr(s: &str, name: &str) -> f64 {
        let tag = &s[..s.find('>').unwrap()];
        let key = format!(" {name}=\"");
        let at = tag.find(&key).unwrap() + key.len();
        let len = tag[at..].find('"').unwrap();
        tag[at..at + len].parse().unwrap()
    }

    fn points(svg: &str, series: &str) -> usize {
        svg.matches(&format!("<circle class=\"pt\" data-series=\"{series}\""))
            .count()
    }

    #[test]
    fn serde_round_trip() {
        for r in [report(4, true), report(3, false), report(1, true)] {
            let text = serde_json::to_string_pretty(&r).unwrap();
            let back: CalibReport = serde_json::from_str(&text).unwrap();
            assert_eq!(back, r);
        }
        let dir = std::env::temp_dir().join(format!("mbq-calib-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.json");
        let r = report(4, true);
        write_json(&r, &path).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("\n  \"layers\": ["));
        assert_eq!(read_json(&path).unwrap(), r);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(|s| s.as_str()).collect();
        k.sort();
        k
    }

    #[test]
    fn json_keys() {
        let v = serde_json::to_value(report(2, true)).unwrap();
        assert_eq!(
            keys(&v),
            ["a_bit", "layers", "method", "model", "n_samples", "w_bit"]
        );
        assert_eq!(v["method"], "mbq");
        assert_eq!(v["w_bit"], 3);
        let layer = &v["layers"][1];
        assert_eq!(keys(layer), ["grad", "groups", "index", "ratio"]);
        assert_eq!(layer["index"], 1);
        assert_eq!(keys(&layer["grad"]), ["attn", "mlp"]);
        assert_eq!(keys(&layer["grad"]["attn"]), ["caption", "vision"]);
        assert_eq!(keys(&layer["grad"]["mlp"]), ["caption", "vision"]);
        assert_eq!(layer["grad"]["attn"]["caption"], 4e-7);
        assert_eq!(keys(&layer["ratio"]), ["attn", "mlp"]);
        assert_eq!(layer["ratio"]["mlp"], 0.1);
        let g = &layer["groups"][0];
        assert_eq!(keys(g), ["alpha", "loss", "losses", "name"]);
        assert_eq!(g["name"], "attn_in");
        assert_eq!(g["losses"].as_array().unwrap().len(), 20);
        // Without sensitivity: no "grad" / "ratio" keys at all.
        let v = serde_json::to_value(report(2, false)).unwrap();
        assert_eq!(keys(&v["layers"][0]), ["groups", "index"]);
        let back: CalibReport = serde_json::from_value(v).unwrap();
        assert!(back
            .layers
            .iter()
            .all(|l| l.grad.is_none() && l.ratio.is_none()));
    }

    #[test]
    fn svg_has_every_point_and_is_well_formed() {
        let r = report(6, true);
        let svg = to_svg(&r);
        check_xml(&svg);
        for s in [
            "vision_attn",
            "caption_attn",
            "vision_mlp",
            "caption_mlp",
            "ratio_attn",
            "ratio_mlp",
            "alpha_attn_in",
            "alpha_attn_out",
            "alpha_mlp_in",
            "alpha_mlp_out",
        ] {
            assert_eq!(points(&svg, s), 6, "series {s}");
        }
        // Title with the settings, escaped.
        assert!(svg.contains("method=mbq"));
        assert!(svg.contains("w_bit=3"));
        assert!(svg.contains("a_bit=16"));
        assert!(svg.contains("model=models/a&lt;b&amp;c"));
        // The zero vision grads of the last layer sit on the axis floor
        // (the plot's bottom edge), not at NaN or -inf.
        assert!(svg.contains("(drawn at the axis floor)"));
        let panel_bottom = {
            let rect = svg.find("<rect x=\"80\"").unwrap();
            attr(&svg[rect..], "y") + attr(&svg[rect..], "height")
        };
        let zero = svg.find("layer 5, vision @ o_proj: 0.000e0").unwrap();
        let circle = svg[..zero].rfind("<circle").unwrap();
        assert_eq!(attr(&svg[circle..], "cy"), panel_bottom);
        // ... and the floor is labelled 0, the positive values lie above it.
        assert!(svg.contains("text-anchor=\"end\">0</text>"));
        let nonzero = svg.find("layer 4, vision @ o_proj: ").unwrap();
        let circle = svg[..nonzero].rfind("<circle").unwrap();
        assert!(attr(&svg[circle..], "cy") < panel_bottom - 10.0);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Layer labels on the x axis.
        assert!(svg.contains(">5</text>"));
    }

    #[test]
    fn svg_without_grads_and_single_layer() {
        let svg = to_svg(&report(3, false));
        check_xml(&svg);
        assert!(svg.contains("no sensitivity data"));
        assert_eq!(points(&svg, "vision_attn"), 0);
        assert_eq!(points(&svg, "ratio_attn"), 0);
        assert_eq!(points(&svg, "alpha_mlp_out"), 3);

        let svg = to_svg(&report(1, true));
        check_xml(&svg);
        for s in ["caption_attn", "ratio_mlp", "alpha_attn_in"] {
            assert_eq!(points(&svg, s), 1, "series {s}");
        }
        assert!(!svg.contains("NaN"));

        let mut empty = report(0, false);
        empty.settings.clear();
        let svg = to_svg(&empty);
        check_xml(&svg);
        assert!(svg.contains("no layers"));

        // Every gradient zero: still drawn, at the floor.
        let mut zeros = report(2, true);
        for l in &mut zeros.layers {
            l.grad = Some(LayerGrad {
                attn: ModalityGrad {
                    vision: 0.0,
                    caption: 0.0,
                },
                mlp: ModalityGrad {
                    vision: 0.0,
                    caption: 0.0,
                },
            });
        }
        let svg = to_svg(&zeros);
        check_xml(&svg);
        assert_eq!(points(&svg, "vision_mlp"), 2);
    }
}
