//! Two `calibration_report.json` compared: the sensitivity ratios, every
//! grid point's loss, and the chosen alphas where the choice is clear.

use std::path::Path;

use serde_json::Value;

/// A run's calibration_report.json.
pub fn report(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("calibration_report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(1e-30)
}

/// How closely two calibration reports must agree.
#[derive(Clone, Copy, Debug)]
pub struct Agreement {
    /// Each sensitivity ratio, relative.
    pub ratio_rtol: f64,
    /// Each grid point's loss, relative.
    pub loss_rtol: f64,
    /// The alphas must be equal where the reference's best loss is this
    /// much (relative) below its runner-up.
    pub alpha_margin: f64,
}

/// Compares report `dev` with the reference `cpu` as `agree` says; returns
/// the largest relative loss difference, the number of grid points over
/// 1e-5 and of all grid points.
pub fn compare(name: &str, cpu: &Value, dev: &Value, agree: Agreement) -> (f64, usize, usize) {
    let (lc, ld) = (
        cpu["layers"].as_array().unwrap(),
        dev["layers"].as_array().unwrap(),
    );
    assert_eq!(lc.len(), ld.len(), "{name}: layers");
    let mut worst = 0f64;
    let (mut over, mut points) = (0, 0);
    for (a, b) in lc.iter().zip(ld) {
        let i = &a["index"];
        for k in ["attn", "mlp"] {
            if let (Some(x), Some(y)) = (a["ratio"][k].as_f64(), b["ratio"][k].as_f64()) {
                assert!(
                    rel(x, y) <= agree.ratio_rtol,
                    "{name} layer {i} ratio {k}: {x} vs {y}"
                );
            }
        }
        let (gc, gd) = (
            a["groups"].as_array().unwrap(),
            b["groups"].as_array().unwrap(),
        );
        assert_eq!(gc.len(), gd.len(), "{name} layer {i}: groups");
        for (g, h) in gc.iter().zip(gd) {
            let group = g["name"].as_str().unwrap();
            assert_eq!(group, h["name"].as_str().unwrap());
            let lossc: Vec<f64> = g["losses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let lossd: Vec<f64> = h["losses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(lossc.len(), lossd.len());
            for (k, (x, y)) in lossc.iter().zip(&lossd).enumerate() {
                worst = worst.max(rel(*x, *y));
                over += usize::from(rel(*x, *y) > 1e-5);
                points += 1;
                assert!(
                    rel(*x, *y) <= agree.loss_rtol,
                    "{name} layer {i} {group} grid point {k}: loss {x} (cpu) vs {y}"
                );
            }
            let mut sorted = lossc.clone();
            sorted.sort_by(f64::total_cmp);
            let clear = sorted.len() < 2 || sorted[1] - sorted[0] > agree.alpha_margin * sorted[0];
            if clear {
                assert_eq!(
                    g["alpha"], h["alpha"],
                    "{name} layer {i} {group}: alpha (cpu losses {lossc:?}, device {lossd:?})"
                );
            }
        }
    }
    (worst, over, points)
}
