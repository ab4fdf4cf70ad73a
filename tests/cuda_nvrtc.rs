//! The CUDA kernels: every `kernels/*.cu` file compiles with NVRTC for
//! sm_80 and sm_90 and defines exactly the entries listed in
//! `mbq::backend::cuda_kernels::SOURCES` (no GPU needed; scripts/test.sh
//! provides NVRTC and runs this with `--features cuda`, and the test FAILS
//! when NVRTC is missing). The kernels are run against the CPU reference
//! only when a CUDA device is present; otherwise that test prints
//! "skipped: no CUDA device (...)".
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use mbq::backend::cuda_kernels::{self, SOURCES};

const ARCHS: &[&str] = &["sm_80", "sm_90"];

fn kernel_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    files
}

fn require_nvrtc() {
    if let Err(e) = cuda_kernels::nvrtc_available() {
        panic!(
            "{e}\nThis test needs NVRTC (no GPU): run scripts/test.sh, which installs the \
             nvidia-cuda-nvrtc-cu12 wheel into .cache/nvrtc and sets LD_LIBRARY_PATH"
        );
    }
}

#[test]
fn every_kernel_file_compiles_with_its_entries() {
    require_nvrtc();
    let files = kernel_files();
    assert!(!files.is_empty(), "no kernels/*.cu files found");
    let mut report = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name")
            .to_string();
        let src = std::fs::read_to_string(path).expect("read kernel source");
        let listed = SOURCES.iter().find(|k| k.file == name).unwrap_or_else(|| {
            panic!("kernels/{name} is not listed in cuda_kernels::SOURCES (embed it there)")
        });
        assert_eq!(
            listed.src, src,
            "kernels/{name}: the embedded source differs from the file (rebuild)"
        );
        let expected: BTreeSet<String> = listed.entries.iter().map(|s| s.to_string()).collect();
        for arch in ARCHS {
            let t = Instant::now();
            let ptx = cuda_kernels::compile(&name, &src, arch).unwrap_or_else(|e| panic!("{e}"));
            let ms = t.elapsed().as_secs_f64() * 1e3;
            assert!(
                ptx.contains(&format!(".target {arch}")),
                "{name}: PTX for {arch} has no `.target {arch}` line"
            );
            let found: BTreeSet<String> = cuda_kernels::ptx_entries(&ptx).into_iter().collect();
            assert_eq!(
                found, expected,
                "kernels/{name} for {arch}: PTX .entry names (left) differ from SOURCES (right)"
            );
            report.push(format!(
                "{name:>16} {arch}: {:>2} entries, {:>7} bytes of PTX, {ms:>6.0} ms",
                found.len(),
                ptx.len()
            ));
        }
    }
    // Every listed file exists (a deleted file must leave SOURCES too).
    for k in SOURCES {
        assert!(
            files
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == k.file)),
            "SOURCES lists {} but kernels/ has no such file",
            k.file
        );
    }
    println!("{}", report.join("\n"));
}

#[test]
fn compile_all_returns_every_file() {
    require_nvrtc();
    let out = cuda_kernels::compile_all("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.len(), SOURCES.len());
    assert!(out.iter().all(|(_, len)| *len > 0));
}

#[test]
fn every_kernel_file_compiles_to_a_cubin() {
    // What the CUDA backend loads first (no JIT on the device).
    require_nvrtc();
    for k in SOURCES {
        for arch in ARCHS {
            let bin =
                cuda_kernels::compile_cubin(k.file, k.src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                bin.starts_with(b"\x7fELF"),
                "{} for {arch}: not an ELF image",
                k.file
            );
        }
    }
    let e = cuda_kernels::compile_cubin("x.cu", "", "compute_90").expect_err("virtual arch");
    assert!(e.to_string().contains("real GPU architecture"), "{e}");
    let src = "extern \"C\" __global__ void k(float *y) { y[0] = no_such_symbol; }\n";
    let e = cuda_kernels::compile_cubin("broken.cu", src, "sm_90")
        .expect_err("a broken kernel must not compile")
        .to_string();
    assert!(
        e.contains("broken.cu") && e.contains("no_such_symbol"),
        "{e}"
    );
}

#[test]
fn compile_errors_name_the_file_and_carry_the_log() {
    require_nvrtc();
    let src = "extern \"C\" __global__ void k(float *y) { y[0] = no_such_symbol; }\n";
    let e = cuda_kernels::compile("broken.cu", src, "sm_90")
        .expect_err("a broken kernel must not compile")
        .to_string();
    assert!(e.contains("broken.cu"), "{e}");
    assert!(e.contains("no_such_symbol"), "NVRTC's log is missing: {e}");
    assert!(e.starts_with("backend cuda:"), "{e}");
    let e = cuda_kernels::compile("x.cu", src, "sm 90").expect_err("bad arch");
    assert!(e.to_string().contains("invalid GPU architecture"), "{e}");
}

/// Runs the kernels on the first CUDA device against the CPU reference.
mod device {
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};
    use cudarc::nvrtc::Ptx;
    use half::f16;
    use mbq::backend::cuda_kernels;
    use mbq::quant::format::PackedLinear;

    /// Relative tolerance of a GEMV output against the f64 CPU sum, scaled
    /// by sum |w x| (f32 accumulation in a different order).
    const GEMV_TOL: f64 = 1e-5;
    const ELEMENTWISE_TOL: f32 = 1e-5;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn f(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        }
    }

    fn module(stream: &Arc<CudaStream>, file: &str) -> Arc<cudarc::driver::CudaModule> {
        let k = cuda_kernels::SOURCES
            .iter()
            .find(|k| k.file == file)
            .expect("listed");
        let ptx = cuda_kernels::compile(k.file, k.src, "compute_80").expect("compile");
        stream
            .context()
            .load_module(Ptx::from_src(ptx))
            .expect("load module")
    }

    fn check_gemv(name: &str, y: &[f32], w: &[f32], x: &[f32], bias: Option<&[f32]>) {
        let inp = x.len();
        for (o, &got) in y.iter().enumerate() {
            let row = &w[o * inp..(o + 1) * inp];
            let want: f64 = row
                .iter()
                .zip(x)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                + bias.map_or(0.0, |b| b[o] as f64);
            let scale: f64 = row
                .iter()
                .zip(x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let err = (got as f64 - want).abs();
            assert!(
                err <= GEMV_TOL * (scale + 1.0),
                "{name}: y[{o}] = {got}, want {want} (err {err:e})"
            );
        }
    }

    pub fn run(ctx: Arc<CudaContext>) {
        let stream = ctx.default_stream();
        let mut rng = Lcg(7);
        let cfg = |out: usize, rows_per_block: usize, threads: u32| LaunchConfig {
            grid_dim: (out.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };

        // Packed GEMV: every bits x group, odd row counts, with and without bias.
        let m = module(&stream, "gemv_packed.cu");
        for bits in [3u32, 4, 8] {
            for group in [32usize, 64, 128] {
                for (out, inp, with_bias) in [(37usize, 384usize, true), (9, 1152, false)] {
                    let entry = cuda_kernels::gemv_packed_entry(bits, group).expect("entry");
                    let f = m.load_function(&entry).expect("function");
                    let codes: Vec<u8> = (0..out * inp)
                        .map(|_| (rng.next() % (1 << bits)) as u8)
                        .collect();
                    let sz: Vec<f16> = (0..out * inp / group)
                        .flat_map(|_| {
                            let s = f16::from_f32(0.01 + 0.05 * rng.f().abs());
                            let z = f16::from_f32((rng.next() % (1 << bits)) as f32);
                            [s, z]
                        })
                        .collect();
                    let p = PackedLinear::from_codes("w", out, inp, bits, group, &codes, sz)
                        .expect("pack");
                    let pairs: Vec<u32> = p
                        .scales_zeros
                        .chunks_exact(2)
                        .map(|c| c[0].to_bits() as u32 | (c[1].to_bits() as u32) << 16)
                        .collect();
                    let x: Vec<f32> = (0..inp).map(|_| rng.f()).collect();
                    let bias: Vec<f32> = (0..out).map(|_| rng.f()).collect();
                    let dx = stream.clone_htod(&x).expect("x");
                    let dq = stream.clone_htod(&p.qweight[..]).expect("q");
                    let dsz = stream.clone_htod(&pairs).expect("sz");
                    let db = stream.clone_htod(&bias).expect("bias");
                    let mut dy = stream.alloc_zeros::<f32>(out).expect("y");
                    let (inp_i, out_i) = (inp as i32, out as i32);
                    let null = 0u64;
                    let mut b = stream.launch_builder(&f);
                    b.arg(&dx).arg(&dq).arg(&dsz);
                    if with_bias {
                        b.arg(&db);
                    } else {
                        b.arg(&null);
                    }
                    // One token (m = 1): the kernel's last argument.
                    let m_i = 1i32;
                    b.arg(&mut dy).arg(&inp_i).arg(&out_i).arg(&m_i);
                    // SAFETY: argument list and sizes as documented in gemv_packed.cu.
                    unsafe { b.launch(cfg(out, 8, 128)) }.expect("launch");
                    let y = stream.clone_dtoh(&dy).expect("y back");
                    let w = p.dequantize();
                    check_gemv(&entry, &y, &w, &x, with_bias.then_some(&bias[..]));
                }
            }
        }

        // Dense f16 GEMV: a vectorised and a scalar (in % 8 != 0) shape.
        let m = module(&stream, "gemv_f16.cu");
        let f = m.load_function("gemv_f16").expect("gemv_f16");
        for (out, inp) in [(33usize, 256usize), (10, 37)] {
            let w16: Vec<f16> = (0..out * inp).map(|_| f16::from_f32(rng.f())).collect();
            let w: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let bits: Vec<u16> = w16.iter().map(|v| v.to_bits()).collect();
            let x: Vec<f32> = (0..inp).map(|_| rng.f()).collect();
            let bias: Vec<f32> = (0..out).map(|_| rng.f()).collect();
            let dw = stream.clone_htod(&bits).expect("w");
            let dx = stream.clone_htod(&x).expect("x");
            let db = stream.clone_htod(&bias).expect("b");
            let mut dy = stream.alloc_zeros::<f32>(out).expect("y");
            let (inp_i, out_i, m_i) = (inp as i32, out as i32, 1i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&dw)
                .arg(&dx)
                .arg(&db)
                .arg(&mut dy)
                .arg(&inp_i)
                .arg(&out_i)
                .arg(&m_i);
            // SAFETY: argument list and sizes as documented in gemv_f16.cu.
            unsafe { b.launch(cfg(out, 8, 128)) }.expect("launch");
            let y = stream.clone_dtoh(&dy).expect("y back");
            check_gemv("gemv_f16", &y, &w, &x, Some(&bias));
        }

        // Element-wise ops and RMSNorm.
        let m = module(&stream, "elementwise.cu");
        let n = 1000usize;
        let a: Vec<f32> = (0..n).map(|_| 4.0 * rng.f()).collect();
        let c: Vec<f32> = (0..n).map(|_| rng.f()).collect();
        let da = stream.clone_htod(&a).expect("a");
        let dc = stream.clone_htod(&c).expect("c");
        let n_i = n as i32;
        for (entry, want) in [
            (
                "add_f32",
                a.iter().zip(&c).map(|(x, y)| x + y).collect::<Vec<f32>>(),
            ),
            (
                "silu_mul_f32",
                a.iter()
                    .zip(&c)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect(),
            ),
        ] {
            let f = m.load_function(entry).expect("function");
            let mut dy = stream.alloc_zeros::<f32>(n).expect("y");
            let mut b = stream.launch_builder(&f);
            b.arg(&da).arg(&dc).arg(&mut dy).arg(&n_i);
            // SAFETY: as documented in elementwise.cu.
            unsafe { b.launch(cfg(n, 256, 256)) }.expect("launch");
            let y = stream.clone_dtoh(&dy).expect("y back");
            for (i, (g, w)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= ELEMENTWISE_TOL * (1.0 + w.abs()),
                    "{entry}[{i}]: {g} vs {w}"
                );
            }
        }
        let (rows, cols, eps) = (5usize, 200usize, 1e-6f32);
        let f = m.load_function("rms_norm_f32").expect("rms_norm_f32");
        let w: Vec<f32> = c[..cols].to_vec();
        let dw = stream.clone_htod(&w).expect("w");
        let mut dy = stream.alloc_zeros::<f32>(rows * cols).expect("y");
        let (r_i, c_i) = (rows as i32, cols as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&da)
            .arg(&dw)
            .arg(&mut dy)
            .arg(&r_i)
            .arg(&c_i)
            .arg(&eps);
        // SAFETY: as documented in elementwise.cu (a holds rows * cols values).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .expect("launch");
        let y = stream.clone_dtoh(&dy).expect("y back");
        for r in 0..rows {
            let row = &a[r * cols..(r + 1) * cols];
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
            for i in 0..cols {
                let want = w[i] * (row[i] * inv);
                let got = y[r * cols + i];
                assert!(
                    (got - want).abs() <= ELEMENTWISE_TOL * (1.0 + want.abs()),
                    "rms_norm[{r}, {i}]: {got} vs {want}"
                );
            }
        }
        println!(
            "CUDA kernels match the CPU reference on {}",
            ctx.name().unwrap_or_default()
        );
    }
}

#[test]
fn kernels_match_cpu_on_device() {
    let names = match mbq::backend::cuda::devices() {
        Ok(names) => names,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    require_nvrtc();
    let ctx = cudarc::driver::CudaContext::new(0).expect("CUDA context on device 0");
    println!("running the CUDA kernels on {}", names.join(", "));
    device::run(ctx);
}
