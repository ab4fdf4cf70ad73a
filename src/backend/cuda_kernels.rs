//! The CUDA kernels' sources (`kernels/*.cu`, embedded with `include_str!`)
//! and their compilation to PTX with NVRTC (feature `cuda`).
//!
//! NVRTC is loaded at run time (cudarc's dynamic loading): the crate builds
//! without it, and [`compile`] returns an error, never a panic, when
//! `libnvrtc` cannot be found. Compiling needs no GPU, so every kernel is
//! compiled in CI (`tests/cuda_nvrtc.rs`, with the NVRTC wheel that
//! scripts/test.sh installs).

use cudarc::nvrtc::{CompileError, CompileOptions};

use crate::error::{Error, Result};

/// One `kernels/*.cu` file: its name, its source and the kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name in `kernels/`, e.g. `gemv_packed.cu`.
    pub file: &'static str,
    pub src: &'static str,
    /// The `extern "C" __global__` entry points, as named in the PTX.
    pub entries: &'static [&'static str],
}

/// Every kernel file. `tests/cuda_nvrtc.rs` checks that each file in
/// `kernels/` is listed here and defines exactly these entries.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "act.cu",
        src: include_str!("../../kernels/act.cu"),
        entries: &["act_f32", "gated_f32"],
    },
    KernelSource {
        file: "act_quant.cu",
        src: include_str!("../../kernels/act_quant.cu"),
        entries: &["act_quant_int8_f32"],
    },
    KernelSource {
        file: "attention.cu",
        src: include_str!("../../kernels/attention.cu"),
        entries: &["attention_f32"],
    },
    KernelSource {
        file: "backward.cu",
        src: include_str!("../../kernels/backward.cu"),
        entries: &[
            "gated_backward_f32",
            "rms_norm_backward_f32",
            "linear_backward_f32",
            "linear_backward_f16",
            "attention_backward_rows_f32",
            "attention_backward_cols_f32",
            "cross_entropy_f32",
        ],
    },
    KernelSource {
        file: "convert.cu",
        src: include_str!("../../kernels/convert.cu"),
        entries: &[
            "f16_to_f32",
            "f32_to_f16",
            "embedding_f16",
            "embedding_f32",
            "dequant_packed_f32",
        ],
    },
    KernelSource {
        file: "elementwise.cu",
        src: include_str!("../../kernels/elementwise.cu"),
        entries: &["add_f32", "silu_mul_f32", "div_cols_f32", "rms_norm_f32"],
    },
    KernelSource {
        file: "gemm.cu",
        src: include_str!("../../kernels/gemm.cu"),
        entries: &["gemm_f32", "bias_rows_f32"],
    },
    KernelSource {
        file: "gemv_f16.cu",
        src: include_str!("../../kernels/gemv_f16.cu"),
        entries: &["gemv_f16"],
    },
    KernelSource {
        file: "gemv_packed.cu",
        src: include_str!("../../kernels/gemv_packed.cu"),
        entries: &[
            "gemv_packed_w3_g32",
            "gemv_packed_w3_g64",
            "gemv_packed_w3_g128",
            "gemv_packed_w4_g32",
            "gemv_packed_w4_g64",
            "gemv_packed_w4_g128",
            "gemv_packed_w8_g32",
            "gemv_packed_w8_g64",
            "gemv_packed_w8_g128",
        ],
    },
    KernelSource {
        file: "norm.cu",
        src: include_str!("../../kernels/norm.cu"),
        entries: &["layer_norm_f32"],
    },
    KernelSource {
        file: "rope.cu",
        src: include_str!("../../kernels/rope.cu"),
        entries: &["rope_f32"],
    },
    KernelSource {
        file: "search.cu",
        src: include_str!("../../kernels/search.cu"),
        entries: &[
            "fake_quant_group_f32",
            "fake_quant_group_f16",
            "fake_quant_w4_f32",
            "fake_quant_w4_f16",
            "loss_rows_f32",
            "loss_terms_f32",
            "abs_rows_f32",
            "abs_col_stats_f32",
            "abs_col_stats_acc_f32",
        ],
    },
];

/// The name of the packed GEMV kernel for `bits` and `group_size` (see
/// `kernels/gemv_packed.cu`), or an error for an unsupported combination.
pub fn gemv_packed_entry(bits: u32, group_size: usize) -> Result<String> {
    if !matches!(bits, 3 | 4 | 8) || !matches!(group_size, 32 | 64 | 128) {
        return Err(err(format!(
            "gemv_packed.cu has no kernel for {bits} bits in groups of {group_size} \
             (bits 3, 4, 8; groups 32, 64, 128)"
        )));
    }
    Ok(format!("gemv_packed_w{bits}_g{group_size}"))
}

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda".into(),
        msg: msg.into(),
    }
}

/// Checks that NVRTC (`libnvrtc.so`, `.so.12`, ...) can be loaded; the
/// error says where cudarc looked and how to provide it.
pub fn nvrtc_available() -> Result<()> {
    // SAFETY: only tries to load the shared library; no NVRTC call is made.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    let mut tried: Vec<String> = Vec::new();
    for name in cudarc::get_lib_name_candidates("nvrtc") {
        if !tried.contains(&name) {
            tried.push(name);
        }
    }
    Err(err(format!(
        "NVRTC could not be loaded (tried {}); install the CUDA toolkit or the \
         `nvidia-cuda-nvrtc-cu12` wheel and put its lib folder on LD_LIBRARY_PATH",
        tried.join(", ")
    )))
}

/// Compiles the CUDA source `src` (named `file` in errors) to PTX for
/// `arch` (`sm_80`, `sm_90`, `compute_90`, ...). The error holds NVRTC's log.
pub fn compile(file: &str, src: &str, arch: &str) -> Result<String> {
    nvrtc_available()?;
    if arch.is_empty() || !arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(err(format!(
            "{file}: invalid GPU architecture \"{arch}\" (expected e.g. sm_90)"
        )));
    }
    if src.contains('\0') || file.contains('\0') {
        return Err(err(format!("{file}: the source contains a NUL byte")));
    }
    let opts = CompileOptions {
        name: Some(file.to_string()),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        CompileError::CompileError {
            nvrtc,
            options,
            log,
            ..
        } => err(format!(
            "{file}: NVRTC failed to compile for {arch} ({nvrtc:?}, options {}):\n{}",
            options.join(" "),
            log.to_string_lossy().trim_end()
        )),
        other => err(format!("{file}: NVRTC error for {arch}: {other:?}")),
    })?;
    // The image is NUL-terminated ASCII; `Ptx::to_src` would panic on
    // anything else, so read the bytes.
    let bytes = ptx.as_bytes().unwrap_or_default();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// Compiles the CUDA source `src` straight to a CUBIN (device code) for the
/// real architecture `arch` (`sm_80`, `sm_90`, ...). Unlike PTX, a CUBIN
/// needs no JIT at load time, so it loads on any driver of the same major
/// CUDA version (minor version compatibility), even one older than NVRTC.
pub fn compile_cubin(file: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::{c_char, CString};
    nvrtc_available()?;
    let digits = arch.strip_prefix("sm_").unwrap_or("");
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(err(format!(
            "{file}: a CUBIN needs a real GPU architecture such as sm_90, not \"{arch}\""
        )));
    }
    let (Ok(csrc), Ok(cname)) = (CString::new(src), CString::new(file)) else {
        return Err(err(format!("{file}: the source contains a NUL byte")));
    };
    let prog = result::create_program(&csrc, Some(&cname))
        .map_err(|e| err(format!("{file}: nvrtcCreateProgram: {e:?}")))?;
    let opts = [format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    // SAFETY: `prog` is a live program until destroy_program below; the
    // buffers are sized by NVRTC's own size queries.
    let out = unsafe {
        let out = match result::compile_program(prog, &opts) {
            Err(e) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&b| b != 0)
                    .collect();
                Err(err(format!(
                    "{file}: NVRTC failed to compile a CUBIN for {arch} ({e:?}):\n{}",
                    String::from_utf8_lossy(&log).trim_end()
                )))
            }
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(err(format!("{file}: nvrtcGetCUBINSize: {e:?}"))),
                    Ok(()) => {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                            .result()
                            .map(|()| buf)
                            .map_err(|e| err(format!("{file}: nvrtcGetCUBIN: {e:?}")))
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        out
    }?;
    if out.is_empty() {
        return Err(err(format!(
            "{file}: NVRTC returned an empty CUBIN for {arch}"
        )));
    }
    Ok(out)
}

/// The `.entry` names of a PTX module.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let rest = line.split(".entry").nth(1)?;
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Compiles every embedded kernel file for `arch` and checks that each
/// defines its listed entries; returns `(file, PTX length in bytes)`.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, usize)>> {
    SOURCES
        .iter()
        .map(|k| {
            let ptx = compile(k.file, k.src, arch)?;
            let found = ptx_entries(&ptx);
            let missing: Vec<&str> = k
                .entries
                .iter()
                .copied()
                .filter(|e| !found.iter().any(|f| f == e))
                .collect();
            if !missing.is_empty() {
                return Err(err(format!(
                    "{}: the PTX for {arch} lacks the kernels {} (found {})",
                    k.file,
                    missing.join(", "),
                    found.join(", ")
                )));
            }
            Ok((k.file, ptx.len()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_parse() {
        let ptx = ".version 8.8\n.target sm_90\n\n\t// .globl\tadd_f32\n.visible .entry add_f32(\n\t.param .u64 a\n)\n.visible .entry rms_norm_f32(\n";
        assert_eq!(ptx_entries(ptx), vec!["add_f32", "rms_norm_f32"]);
    }

    #[test]
    fn packed_entry_names() {
        assert_eq!(
            gemv_packed_entry(3, 128).ok().as_deref(),
            Some("gemv_packed_w3_g128")
        );
        assert!(gemv_packed_entry(2, 128).is_err());
        assert!(gemv_packed_entry(4, 96).is_err());
        let listed = SOURCES.iter().find(|k| k.file == "gemv_packed.cu");
        for bits in [3, 4, 8] {
            for g in [32, 64, 128] {
                let name = gemv_packed_entry(bits, g).unwrap_or_default();
                assert!(
                    listed.is_some_and(|k| k.entries.contains(&name.as_str())),
                    "{name}"
                );
            }
        }
    }
}
