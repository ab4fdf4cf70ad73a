//! Adapters and the device: which GPUs wgpu sees (for `mbq devices` and
//! `--backend auto`), how one is picked (`--adapter NAME`), and the device
//! opened on it with the adapter's own limits and the features the shaders
//! can use (`SUBGROUP`; `SHADER_F16` for the scale search's f16 products;
//! WGSL's `dot4I8Packed` for W4A8). Validation errors
//! that no error scope catches are collected here and reported by the next
//! flush as `Error::Backend`.

use std::sync::{Arc, Mutex};

use wgpu::{Backends, DeviceType, Features};

use super::err;
use crate::error::Result;

/// How to open the wgpu backend.
#[derive(Clone, Debug)]
pub struct WgpuOptions {
    /// Pick the first adapter whose name contains this (case-insensitive).
    pub adapter: Option<String>,
    /// Accept a CPU adapter (lavapipe, llvmpipe, WARP) when no name is given.
    pub allow_cpu: bool,
    /// Use subgroup reductions when the adapter has `SUBGROUP` (false forces
    /// the workgroup-memory fallback).
    pub subgroups: bool,
    /// Split weights into bindings of at most this many bytes (testing the
    /// split path); `None` means the device's `max_storage_buffer_binding_size`.
    pub max_binding: Option<u64>,
    /// Request `TIMESTAMP_QUERY` when the adapter has it, so benchmarks can
    /// time kernels on the device (false: wall clock only).
    pub timestamps: bool,
    /// Run W4A8 linears with integer dot products (`dot4I8Packed`) when the
    /// WGSL language feature `packed_4x8_integer_dot_product` is there
    /// (false forces the fake-quant + float packed product fallback).
    pub dot4: bool,
    /// Read the scale search's f16 operands as WGSL `f16` when the adapter
    /// has `SHADER_F16` (false: as u32 pairs through `unpack2x16float`).
    pub shader_f16: bool,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            adapter: None,
            allow_cpu: false,
            subgroups: true,
            max_binding: None,
            timestamps: true,
            dot4: true,
            shader_f16: true,
        }
    }
}

impl WgpuOptions {
    /// Defaults overridden by the environment: `MBQ_WGPU_ADAPTER` (a name),
    /// `MBQ_WGPU_NO_SUBGROUP=1`, `MBQ_WGPU_MAX_BINDING` (bytes),
    /// `MBQ_WGPU_NO_TIMESTAMPS=1`, `MBQ_WGPU_NO_DOT4=1`, `MBQ_WGPU_NO_F16=1`.
    pub fn from_env() -> Self {
        let mut o = WgpuOptions::default();
        if let Ok(name) = std::env::var("MBQ_WGPU_ADAPTER") {
            if !name.is_empty() {
                o.adapter = Some(name);
            }
        }
        if std::env::var("MBQ_WGPU_NO_SUBGROUP").is_ok_and(|v| v == "1") {
            o.subgroups = false;
        }
        if std::env::var("MBQ_WGPU_NO_TIMESTAMPS").is_ok_and(|v| v == "1") {
            o.timestamps = false;
        }
        if std::env::var("MBQ_WGPU_NO_DOT4").is_ok_and(|v| v == "1") {
            o.dot4 = false;
        }
        if std::env::var("MBQ_WGPU_NO_F16").is_ok_and(|v| v == "1") {
            o.shader_f16 = false;
        }
        if let Some(b) = std::env::var("MBQ_WGPU_MAX_BINDING")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            o.max_binding = Some(b);
        }
        o
    }
}

/// One adapter as `mbq devices` lists it.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// A real GPU (discrete, integrated or virtual), not a CPU rasterizer.
    pub is_gpu: bool,
    pub driver: String,
    /// The features the mbq shaders care about, by name.
    pub features: Vec<&'static str>,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    pub subgroup_sizes: (u32, u32),
    /// The WGSL language feature `packed_4x8_integer_dot_product`
    /// (`dot4I8Packed`) is accepted. A property of the wgpu instance, not of
    /// the adapter: wgpu-core (naga) reports it on every native backend and
    /// lowers it to the device's integer dot product where it has one
    /// (SPIR-V `OpSDot` with `VK_KHR_shader_integer_dot_product` / Vulkan
    /// 1.3, HLSL `dot4add_i8packed` from SM 6.4, Metal `packed_char4`) and to
    /// exact extract-multiply-add integer code where it does not. Exact
    /// either way; only the speed differs.
    pub wgsl_dot4: bool,
}

impl AdapterReport {
    /// One line per adapter for `mbq devices`.
    pub fn summary(&self) -> String {
        format!(
            "{} ({}, {}, driver {}) features [{}] wgsl dot4I8Packed {}, max binding {} MiB, max buffer {} MiB, workgroup memory {} KiB, {} invocations, subgroup {}..{}",
            self.name,
            self.backend,
            self.device_type,
            if self.driver.is_empty() { "?" } else { &self.driver },
            self.features.join(", "),
            if self.wgsl_dot4 { "yes" } else { "no" },
            self.max_storage_binding >> 20,
            self.max_buffer >> 20,
            self.max_workgroup_storage >> 10,
            self.max_invocations,
            self.subgroup_sizes.0,
            self.subgroup_sizes.1,
        )
    }
}

/// The features worth reporting (and, for SUBGROUP, using).
const REPORTED: &[(Features, &str)] = &[
    (Features::SHADER_F16, "SHADER_F16"),
    (Features::SUBGROUP, "SUBGROUP"),
    (Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
    (Features::SHADER_INT64, "SHADER_INT64"),
    (Features::SHADER_F64, "SHADER_F64"),
    (Features::IMMEDIATES, "IMMEDIATES"),
];

fn instance() -> wgpu::Instance {
    // Vulkan, Metal, DX12 (and WebGPU in a browser); GL only when
    // WGPU_BACKEND asks for it, so lavapipe's Vulkan device is preferred
    // over llvmpipe's GL one.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = Backends::from_env().unwrap_or(Backends::PRIMARY);
    desc.flags = wgpu::InstanceFlags::empty().with_env();
    wgpu::Instance::new(desc)
}

fn is_gpu(t: DeviceType) -> bool {
    matches!(
        t,
        DeviceType::DiscreteGpu | DeviceType::IntegratedGpu | DeviceType::VirtualGpu
    )
}

/// Preference order when no name is given: discrete, integrated, virtual,
/// then CPU; native APIs before GL.
fn rank(info: &wgpu::AdapterInfo) -> (u32, u32) {
    let t = match info.device_type {
        DeviceType::DiscreteGpu => 0,
        DeviceType::IntegratedGpu => 1,
        DeviceType::VirtualGpu => 2,
        DeviceType::Cpu => 3,
        DeviceType::Other => 4,
    };
    let b = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (t, b)
}

/// Whether the instance's WGSL has `dot4I8Packed`.
fn has_dot4(lang: &wgpu::WgslLanguageFeatures) -> bool {
    lang.contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct)
}

fn report(a: &wgpu::Adapter, lang: &wgpu::WgslLanguageFeatures) -> AdapterReport {
    let info = a.get_info();
    let f = a.features();
    let l = a.limits();
    AdapterReport {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        is_gpu: is_gpu(info.device_type),
        driver: [info.driver.as_str(), info.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
        features: REPORTED
            .iter()
            .filter(|(flag, _)| f.contains(*flag))
            .map(|(_, n)| *n)
            .collect(),
        max_storage_binding: l.max_storage_buffer_binding_size,
        max_buffer: l.max_buffer_size,
        max_workgroup_storage: l.max_compute_workgroup_storage_size,
        max_invocations: l.max_compute_invocations_per_workgroup,
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        wgsl_dot4: has_dot4(lang),
    }
}

/// Every adapter wgpu can open here, best first.
pub fn adapters() -> Vec<AdapterReport> {
    let inst = instance();
    let lang = inst.wgsl_language_features();
    let mut list = pollster::block_on(inst.enumerate_adapters(Backends::all()));
    list.sort_by_key(|a| rank(&a.get_info()));
    list.iter().map(|a| report(a, &lang)).collect()
}

/// The adapter `opts` asks for (or why there is none) and the WGSL
/// language features of its instance.
fn pick(opts: &WgpuOptions) -> Result<(wgpu::Adapter, wgpu::WgslLanguageFeatures)> {
    let inst = instance();
    let lang = inst.wgsl_language_features();
    let mut list = pollster::block_on(inst.enumerate_adapters(Backends::all()));
    list.sort_by_key(|a| rank(&a.get_info()));
    let names = || {
        let n: Vec<String> = list
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect();
        if n.is_empty() {
            "none".to_string()
        } else {
            n.join("; ")
        }
    };
    if list.is_empty() {
        return Err(err(
            "no wgpu adapter found (no Vulkan, Metal or DX12 driver); on Debian/Ubuntu a CPU \
             Vulkan device for testing comes with `apt-get install mesa-vulkan-drivers`",
        ));
    }
    let wanted = opts
        .adapter
        .clone()
        .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
        .filter(|n| !n.is_empty());
    let found = match &wanted {
        Some(name) => {
            let lower = name.to_lowercase();
            list.iter()
                .position(|a| a.get_info().name.to_lowercase().contains(&lower))
                .ok_or_else(|| {
                    err(format!(
                        "no adapter named like \"{name}\"; adapters: {}",
                        names()
                    ))
                })?
        }
        None => list
            .iter()
            .position(|a| opts.allow_cpu || is_gpu(a.get_info().device_type))
            .ok_or_else(|| {
                err(format!(
                    "no GPU adapter (only CPU ones: {}); name one with --adapter to use it",
                    names()
                ))
            })?,
    };
    Ok((list.swap_remove(found), lang))
}

/// The adapter `opts` would open, without opening it (for `--backend auto`).
pub fn probe(opts: &WgpuOptions) -> Result<AdapterReport> {
    pick(opts).map(|(a, lang)| report(&a, &lang))
}

/// Compiled once at device creation when the instance claims `dot4I8Packed`.
const DOT4_PROBE: &str = "@group(0) @binding(0) var<storage, read_write> o: array<i32>;
@compute @workgroup_size(1) fn main() { o[0] = dot4I8Packed(u32(o[1]), u32(o[2])); }";

/// An open device and what the shaders may use on it.
pub struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Subgroup reductions are compiled in.
    pub subgroups: bool,
    /// `TIMESTAMP_QUERY` is enabled (compute passes can write timestamps).
    pub timestamps: bool,
    /// W4A8 linears use the integer `dot4I8Packed` kernels (the WGSL
    /// feature is there, a probe shader compiled, and `opts.dot4`).
    pub dot4: bool,
    /// `SHADER_F16` is enabled: shaders with flag HALF read f16 operands as
    /// WGSL `f16`.
    pub shader_f16: bool,
    /// The adapter has `SHADER_F16` (whether or not it is used).
    pub adapter_f16: bool,
    /// Largest storage binding (bytes) a weight chunk may use.
    pub max_binding: u64,
    /// Validation errors nobody caught, drained at each flush.
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Context {
    pub fn open(opts: &WgpuOptions) -> Result<Context> {
        let (adapter, lang) = pick(opts)?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let subgroups = opts.subgroups && adapter.features().contains(Features::SUBGROUP);
        let mut features = Features::empty();
        if subgroups {
            features |= Features::SUBGROUP;
        }
        // Pass timestamp writes need only TIMESTAMP_QUERY (not the
        // _INSIDE_ENCODERS / _INSIDE_PASSES extensions).
        let timestamps = opts.timestamps && adapter.features().contains(Features::TIMESTAMP_QUERY);
        if timestamps {
            features |= Features::TIMESTAMP_QUERY;
        }
        let adapter_f16 = adapter.features().contains(Features::SHADER_F16);
        let shader_f16 = opts.shader_f16 && adapter_f16;
        if shader_f16 {
            features |= Features::SHADER_F16;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("mbq"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| err(format!("{}: request_device: {e}", info.name)))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let mut max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if let Some(m) = opts.max_binding {
            max_binding = max_binding.min(m.max(256));
        }
        // A device could still reject the built-in: then the fallback runs.
        let dot4 = opts.dot4
            && has_dot4(&lang)
            && super::kernels::compile_source(
                &device,
                "dot4I8Packed probe",
                DOT4_PROBE.to_string(),
                "main",
            )
            .is_ok();
        Ok(Context {
            device,
            queue,
            info,
            limits,
            subgroups,
            timestamps,
            dot4,
            shader_f16,
            adapter_f16,
            max_binding,
            errors,
        })
    }

    /// The uncaught validation errors since the last call, as one error.
    pub fn take_errors(&self, what: &str) -> Result<()> {
        let mut v = self
            .errors
            .lock()
            .map_err(|_| err("the error log lock is poisoned"))?;
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("\n");
        v.clear();
        Err(err(format!("{what}: {msg}")))
    }
}
