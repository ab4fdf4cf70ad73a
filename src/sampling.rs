//! Sampling: the options of a generation, the sampler (greedy at
//! temperature 0, otherwise temperature, top-k and top-p with a seed, in
//! transformers' order) and the sampling defaults of a model's
//! `generation_config.json`.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens before top-p; 0 = off.
    pub top_k: usize,
    pub seed: u64,
    /// Keep generating after an EOS token.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            ignore_eos: false,
        }
    }
}

/// The sampling settings of a model's `generation_config.json`, with
/// transformers' semantics: `do_sample` false or absent means greedy
/// whatever `temperature` says; with `do_sample` true a missing
/// `temperature` is 1.0, `top_p` 1.0 and `top_k` 50 (`GenerationConfig`'s
/// defaults). A `null` value counts as absent.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingDefaults {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
}

impl Default for SamplingDefaults {
    /// No generation_config.json: greedy.
    fn default() -> Self {
        SamplingDefaults {
            do_sample: false,
            temperature: None,
            top_p: None,
            top_k: None,
        }
    }
}

impl SamplingDefaults {
    /// Reads `dir/generation_config.json`; greedy defaults when it is absent.
    pub fn load(dir: &Path) -> Result<SamplingDefaults> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(SamplingDefaults::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
        SamplingDefaults::from_json(&path, &json)
    }

    /// The sampling keys of a parsed generation_config.json (`path` names
    /// it in errors).
    pub fn from_json(path: &Path, json: &serde_json::Value) -> Result<SamplingDefaults> {
        let obj = json
            .as_object()
            .ok_or_else(|| Error::config(path, "expected a JSON object"))?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let bad = |key: &str, want: &str, v: &serde_json::Value| {
            Error::config(path, format!("\"{key}\" must be {want}, found {v}"))
        };
        let do_sample = match get("do_sample") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad("do_sample", "true or false", v))?,
        };
        let temperature = match get("temperature") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(t) if t >= 0.0 => Some(t as f32),
                _ => return Err(bad("temperature", "a number >= 0", v)),
            },
        };
        let top_p = match get("top_p") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(p) if p > 0.0 && p <= 1.0 => Some(p as f32),
                _ => return Err(bad("top_p", "a number in (0, 1]", v)),
            },
        };
        let top_k = match get("top_k") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(k) => {
                    Some(usize::try_from(k).map_err(|_| bad("top_k", "an integer >= 0", v))?)
                }
                None => return Err(bad("top_k", "an integer >= 0", v)),
            },
        };
        Ok(SamplingDefaults {
            do_sample,
            temperature,
            top_p,
            top_k,
        })
    }

    /// `(temperature, top_p, top_k)` for a request: each explicit value
    /// wins; the others come from the config. Greedy (temperature 0) when
    /// the config does not sample and no temperature is given; an explicit
    /// temperature samples with the config's top-p / top-k where it has
    /// them (else 1.0 and off).
    pub fn resolve(
        &self,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
    ) -> (f32, f32, usize) {
        if self.do_sample {
            (
                temperature.or(self.temperature).unwrap_or(1.0),
                top_p.or(self.top_p).unwrap_or(1.0),
                top_k.or(self.top_k).unwrap_or(50),
            )
        } else {
            (
                temperature.unwrap_or(0.0),
                top_p.or(self.top_p).unwrap_or(1.0),
                top_k.or(self.top_k).unwrap_or(0),
            )
        }
    }

    /// [`SamplingDefaults::resolve`] into `opts`.
    pub fn apply(
        &self,
        opts: &mut GenerateOptions,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
    ) {
        (opts.temperature, opts.top_p, opts.top_k) = self.resolve(temperature, top_p, top_k);
    }
}

/// Picks the next token from last-position logits: greedy at temperature
/// 0; otherwise, as transformers' warpers in their order, the logits over
/// the temperature, then top-k (the `top_k` most likely tokens and any tied
/// with the last of them), then top-p (the smallest most-likely set whose
/// mass reaches `top_p`, at least one token), then a draw.
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: usize,
    rng: StdRng,
}

impl Sampler {
    pub fn new(opts: &GenerateOptions) -> Self {
        Sampler {
            temperature: opts.temperature,
            top_p: opts.top_p,
            top_k: opts.top_k,
            rng: StdRng::seed_from_u64(opts.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || logits.is_empty() {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l - max) / self.temperature).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Top-k: the k most likely and those tied with the k-th, the rest
        // renormalized.
        if self.top_k > 0 && self.top_k < probs.len() {
            let kth = probs[self.top_k - 1].1;
            let keep = probs.iter().take_while(|p| p.1 >= kth).count();
            probs.truncate(keep);
            let mass: f32 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= mass);
        }
        // Smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        let kept = &probs[..keep];
        let mass: f32 = kept.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f32>() * mass;
        for p in kept {
            u -= p.1;
            if u <= 0.0 {
                return p.0 as u32;
            }
        }
        kept[kept.len() - 1].0 as u32
    }
}

/// Index of the first maximum (as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults(v: serde_json::Value) -> Result<SamplingDefaults> {
        SamplingDefaults::from_json(Path::new("m/generation_config.json"), &v)
    }

    #[test]
    fn generation_config_without_do_sample_is_greedy() {
        // do_sample absent or false: greedy whatever temperature says.
        for cfg in [
            json!({"eos_token_id": 2}),
            json!({"do_sample": false, "temperature": 0.7, "top_p": 0.9}),
            json!({"do_sample": null, "temperature": 0.7}),
        ] {
            let d = defaults(cfg.clone()).unwrap();
            assert_eq!(d.resolve(None, None, None).0, 0.0, "{cfg}");
        }
        // An explicit temperature samples, with the config's top-p.
        let d = defaults(json!({"temperature": 0.7, "top_p": 0.9})).unwrap();
        assert_eq!(d.resolve(Some(0.5), None, None), (0.5, 0.9, 0));
        assert_eq!(
            SamplingDefaults::default().resolve(None, None, None),
            (0.0, 1.0, 0)
        );
    }

    #[test]
    fn generation_config_do_sample_uses_hf_defaults() {
        let d = defaults(json!({"do_sample": true})).unwrap();
        assert_eq!(d.resolve(None, None, None), (1.0, 1.0, 50));
        let d = defaults(json!({"do_sample": true, "temperature": 0.6, "top_p": 0.8, "top_k": 20}))
            .unwrap();
        assert_eq!(d.resolve(None, None, None), (0.6, 0.8, 20));
        // Explicit values win, an explicit temperature 0 is greedy.
        assert_eq!(d.resolve(Some(0.0), None, None), (0.0, 0.8, 20));
        assert_eq!(d.resolve(Some(0.9), Some(0.5), Some(0)), (0.9, 0.5, 0));
        let mut o = GenerateOptions::default();
        d.apply(&mut o, None, Some(1.0), None);
        assert_eq!((o.temperature, o.top_p, o.top_k), (0.6, 1.0, 20));
    }

    #[test]
    fn generation_config_bad_values_name_the_file_and_key() {
        for (cfg, key) in [
            (json!({"do_sample": "yes"}), "do_sample"),
            (
                json!({"do_sample": true, "temperature": "hot"}),
                "temperature",
            ),
            (json!({"temperature": -1.0}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_k": 2.5}), "top_k"),
            (json!({"top_k": -1}), "top_k"),
        ] {
            let e = defaults(cfg.clone()).unwrap_err().to_string();
            assert!(
                e.contains("m/generation_config.json") && e.contains(&format!("\"{key}\"")),
                "{cfg}: {e}"
            );
        }
        let e = defaults(json!([1])).unwrap_err().to_string();
        assert!(e.contains("generation_config.json"), "{e}");
    }

    #[test]
    fn generation_config_missing_file_is_greedy_and_bad_json_is_an_error() {
        let dir = std::env::temp_dir().join(format!("mbq_gencfg_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("generation_config.json"));
        assert_eq!(
            SamplingDefaults::load(&dir).unwrap(),
            SamplingDefaults::default()
        );
        std::fs::write(dir.join("generation_config.json"), "{ not json").unwrap();
        let e = SamplingDefaults::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("JSON"),
            "{e}"
        );
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"do_sample": true, "top_k": 3}"#,
        )
        .unwrap();
        assert_eq!(SamplingDefaults::load(&dir).unwrap().top_k, Some(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler::new(&GenerateOptions {
            temperature,
            top_p,
            top_k,
            seed,
            ..GenerateOptions::default()
        })
    }

    #[test]
    fn top_k_keeps_only_the_k_most_likely() {
        let logits = [0.0, 3.0, 1.0, 2.9, 2.8, -1.0];
        let mut seen = [0usize; 6];
        let mut s = sampler(5.0, 1.0, 2, 7);
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        // Only tokens 1 and 3, both often (a high temperature flattens).
        assert_eq!(seen[0] + seen[2] + seen[4] + seen[5], 0, "{seen:?}");
        assert!(seen[1] > 500 && seen[3] > 500, "{seen:?}");
        // top_k 1 is greedy.
        let mut s = sampler(5.0, 1.0, 1, 7);
        assert!((0..100).all(|_| s.sample(&logits) == 1));
        // Ties with the k-th are kept (as TopKLogitsWarper's `<` threshold).
        let tied = [1.0, 2.0, 2.0, 0.0];
        let mut s = sampler(1.0, 1.0, 1, 3);
        let picks: std::collections::BTreeSet<u32> = (0..200).map(|_| s.sample(&tied)).collect();
        assert_eq!(picks, [1, 2].into_iter().collect());
    }

    #[test]
    fn top_k_applies_before_top_p() {
        // Probabilities [0.45, 0.35, 0.11, 0.09]: top-p 0.85 alone keeps 3
        // tokens (0.80 < 0.85); top-k 3 first renormalizes them to [0.495,
        // 0.385, 0.121], and top-p 0.85 then keeps 2 (0.879).
        let logits = [0.45f32.ln(), 0.35f32.ln(), 0.11f32.ln(), 0.09f32.ln()];
        let picks = |top_k| {
            let mut s = sampler(1.0, 0.85, top_k, 11);
            (0..2000)
                .map(|_| s.sample(&logits))
                .collect::<std::collections::BTreeSet<u32>>()
        };
        assert_eq!(picks(3), [0, 1].into_iter().collect());
        assert_eq!(picks(0), [0, 1, 2].into_iter().collect());
        // Same seed and options: the same draws.
        let (mut a, mut b) = (sampler(0.8, 0.95, 3, 5), sampler(0.8, 0.95, 3, 5));
        for _ in 0..50 {
            assert_eq!(a.sample(&logits), b.sample(&logits));
        }
        // Off (0) or k >= vocab: the plain top-p sampler's draws.
        let (mut a, mut b) = (sampler(0.8, 0.95, 0, 5), sampler(0.8, 0.95, 4, 5));
        for _ in 0..50 {
            assert_eq!(a.sample(&logits), b.sample(&logits));
        }
    }
}
