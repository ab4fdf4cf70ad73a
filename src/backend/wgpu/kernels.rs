//! The WGSL kernels: sources embedded from `shaders/`, a small preprocessor
//! (`#include "file"`, `#if NAME` / `#if !NAME` / `#else` / `#endif`, and
//! constants injected from Rust as `const NAME: u32`; flag HALF, for a
//! source that uses WGSL's `f16`, also puts `enable f16;` first), and the compute
//! pipelines cached by (file, entry, constants). Every shader module and
//! pipeline is labelled with its key, and a shader that does not compile or
//! validate becomes an `Error::Backend` naming it.

use std::collections::HashMap;
use std::sync::Mutex;

use super::err;
use crate::error::Result;

/// Every shader file, by name.
const SOURCES: &[(&str, &str)] = &[
    ("common.wgsl", include_str!("../../../shaders/common.wgsl")),
    ("packed.wgsl", include_str!("../../../shaders/packed.wgsl")),
    ("act.wgsl", include_str!("../../../shaders/act.wgsl")),
    (
        "elementwise.wgsl",
        include_str!("../../../shaders/elementwise.wgsl"),
    ),
    ("norm.wgsl", include_str!("../../../shaders/norm.wgsl")),
    ("rope.wgsl", include_str!("../../../shaders/rope.wgsl")),
    (
        "embedding.wgsl",
        include_str!("../../../shaders/embedding.wgsl"),
    ),
    ("gemv.wgsl", include_str!("../../../shaders/gemv.wgsl")),
    (
        "gemv_packed.wgsl",
        include_str!("../../../shaders/gemv_packed.wgsl"),
    ),
    (
        "gemv_w4a8.wgsl",
        include_str!("../../../shaders/gemv_w4a8.wgsl"),
    ),
    ("gemm.wgsl", include_str!("../../../shaders/gemm.wgsl")),
    (
        "attention.wgsl",
        include_str!("../../../shaders/attention.wgsl"),
    ),
    (
        "attention_backward.wgsl",
        include_str!("../../../shaders/attention_backward.wgsl"),
    ),
    (
        "backward.wgsl",
        include_str!("../../../shaders/backward.wgsl"),
    ),
    (
        "cross_entropy.wgsl",
        include_str!("../../../shaders/cross_entropy.wgsl"),
    ),
    (
        "act_quant.wgsl",
        include_str!("../../../shaders/act_quant.wgsl"),
    ),
    (
        "fake_quant.wgsl",
        include_str!("../../../shaders/fake_quant.wgsl"),
    ),
    ("loss.wgsl", include_str!("../../../shaders/loss.wgsl")),
    ("stats.wgsl", include_str!("../../../shaders/stats.wgsl")),
    ("half.wgsl", include_str!("../../../shaders/half.wgsl")),
];

fn source(name: &str) -> Result<&'static str> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| err(format!("no shader named {name}")))
}

/// What identifies a pipeline: the file, its entry point and the constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub file: &'static str,
    pub entry: &'static str,
    /// `(NAME, value)`, emitted as `const NAME: u32 = value;` and usable in
    /// `#if NAME` (true when non-zero).
    pub defs: Vec<(&'static str, u32)>,
}

impl KernelKey {
    pub fn new(file: &'static str, entry: &'static str) -> Self {
        KernelKey {
            file,
            entry,
            defs: Vec::new(),
        }
    }

    /// Adds a constant (or a flag, with value 1).
    pub fn def(mut self, name: &'static str, value: u32) -> Self {
        self.defs.push((name, value));
        self
    }

    /// `file:entry[NAME=v,...]`: the label of every wgpu object made for it.
    pub fn label(&self) -> String {
        let defs: Vec<String> = self.defs.iter().map(|(n, v)| format!("{n}={v}")).collect();
        format!("{}:{}[{}]", self.file, self.entry, defs.join(","))
    }
}

/// Expands includes and conditionals and prepends the constants.
pub fn preprocess(file: &str, defs: &[(&'static str, u32)]) -> Result<String> {
    let mut out = String::new();
    if defs.iter().any(|(n, v)| *n == "HALF" && *v != 0) {
        out.push_str("enable f16;\n");
    }
    for (n, v) in defs {
        out.push_str(&format!("const {n}: u32 = {v}u;\n"));
    }
    let mut included = Vec::new();
    expand(file, defs, &mut out, &mut included)?;
    Ok(out)
}

fn expand(
    file: &str,
    defs: &[(&'static str, u32)],
    out: &mut String,
    included: &mut Vec<String>,
) -> Result<()> {
    if included.iter().any(|f| f == file) {
        return Ok(());
    }
    included.push(file.to_string());
    let is_set = |name: &str| defs.iter().any(|(n, v)| *n == name && *v != 0);
    // Stack of (this branch active, parent active).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.last().is_none_or(|(a, p)| *a && *p);
    for (i, line) in source(file)?.lines().enumerate() {
        let t = line.trim();
        let bad = |what: &str| err(format!("{file}:{}: {what}", i + 1));
        if let Some(cond) = t.strip_prefix("#if ") {
            let cond = cond.trim();
            let v = match cond.strip_prefix('!') {
                Some(n) => !is_set(n.trim()),
                None => is_set(cond),
            };
            let parent = active(&stack);
            stack.push((v, parent));
        } else if t == "#else" {
            let top = stack.last_mut().ok_or_else(|| bad("#else without #if"))?;
            top.0 = !top.0;
        } else if t == "#endif" {
            stack.pop().ok_or_else(|| bad("#endif without #if"))?;
        } else if let Some(inc) = t.strip_prefix("#include ") {
            if active(&stack) {
                expand(inc.trim().trim_matches('"'), defs, out, included)?;
            }
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(err(format!("{file}: #if without #endif")));
    }
    Ok(())
}

/// Compiled pipelines by key.
#[derive(Default)]
pub struct Kernels {
    cache: Mutex<HashMap<KernelKey, wgpu::ComputePipeline>>,
}

impl Kernels {
    /// The pipeline for `key`, compiled at first use.
    pub fn get(&self, device: &wgpu::Device, key: &KernelKey) -> Result<wgpu::ComputePipeline> {
        {
            let cache = self
                .cache
                .lock()
                .map_err(|_| err("the pipeline cache lock is poisoned"))?;
            if let Some(p) = cache.get(key) {
                return Ok(p.clone());
            }
        }
        let p = compile(device, key)?;
        self.cache
            .lock()
            .map_err(|_| err("the pipeline cache lock is poisoned"))?
            .insert(key.clone(), p.clone());
        Ok(p)
    }
}

fn compile(device: &wgpu::Device, key: &KernelKey) -> Result<wgpu::ComputePipeline> {
    compile_source(
        device,
        &key.label(),
        preprocess(key.file, &key.defs)?,
        key.entry,
    )
}

/// Compiles WGSL `src` into a compute pipeline labelled `label`; a parse,
/// validation or pipeline error becomes `Error::Backend` naming `label`.
pub fn compile_source(
    device: &wgpu::Device,
    label: &str,
    src: String,
    entry: &str,
) -> Result<wgpu::ComputePipeline> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(err(format!("shader {label} failed to compile: {e}")));
    }
    Ok(pipeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shader_preprocesses_in_every_variant() {
        for (name, _) in SOURCES {
            for flags in [&[][..], &[("SUBGROUP", 1), ("F16", 1), ("BIAS", 1)][..]] {
                let s = preprocess(name, flags).unwrap();
                assert!(!s.contains("#if") && !s.contains("#endif"), "{name}");
            }
        }
    }
}
