//! `mbq`: the project's tools as subcommands (`quantize`; more arrive with
//! calibration and benchmarking).

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "mbq",
    version,
    about = "Modality-balanced quantization for VLMs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the compute devices this build can use.
    Devices,
    /// Print a model directory's configuration as mbq reads it.
    Inspect {
        /// Model directory.
        #[arg(long)]
        model: std::path::PathBuf,
    },
    /// Quantize a model's decoder linears into the packed format (a new
    /// directory; nothing is overwritten).
    Quantize {
        /// Quantization method.
        #[arg(long, value_enum, default_value_t = Method::Rtn)]
        method: Method,
        /// Weight bits: 3, 4 or 8.
        #[arg(long)]
        w_bit: u32,
        /// Input features per (scale, zero) group: 32, 64 or 128.
        #[arg(long, default_value_t = 128)]
        group_size: usize,
        /// Input model directory (read only).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Output directory; must not exist.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Generate the synthetic shapes VQA task: PNGs in OUT/images and
    /// OUT/questions.jsonl (LLaVA format). Same seed, same bytes.
    Shapes {
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of images.
        #[arg(long)]
        count: usize,
        /// Output directory; must not exist (or be empty).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Accuracy of a model on a LLaVA-format question file (exact match,
    /// greedy; per type; caption perplexity). The model is loaded once.
    Eval {
        /// Model directory, or a bundled model name (tiny-shapes, tiny-shapes-w3).
        #[arg(long)]
        model: String,
        /// questions.jsonl (as `mbq shapes` writes it).
        #[arg(long)]
        data: std::path::PathBuf,
        /// Folder the "image" paths are relative to (default: the data file's folder).
        #[arg(long)]
        image_folder: Option<std::path::PathBuf>,
        /// auto, cpu, wgpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: mbq::backend::BackendKind,
        /// wgpu: the adapter whose name contains NAME.
        #[arg(long, value_name = "NAME")]
        adapter: Option<String>,
        /// Only the first N questions.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: fused packed GEMV vs dense f16, and decode tokens/s.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// W3 and W4 (g128) fused dequant-GEMV against a dense f16 GEMV.
    /// Timed with GPU timestamps where the backend has them (wgpu with
    /// TIMESTAMP_QUERY), else wall clock; the wall clock is kept too.
    Gemv {
        /// Backend: cpu or wgpu.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Shapes as IN x OUT; default: the paper's LLaVA-OneVision-7B ones.
        #[arg(long, default_value = "3584x3584,3584x10752,3584x18944,18944x3584")]
        shapes: String,
        /// Launches per timed repetition.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Rotate weight copies until they exceed this many MiB (caches).
        #[arg(long, default_value_t = 256)]
        rotate_mib: usize,
        #[arg(long)]
        json: bool,
    },
    /// Decode tokens/s: FP16 vs W3 vs W4 (g128).
    Decode {
        /// Backend: cpu or wgpu.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// A model directory (its language model is benchmarked).
        #[arg(long, conflicts_with = "synthetic")]
        model: Option<std::path::PathBuf>,
        /// A synthetic model of a real shape: llava-ov-7b or llava-1.5-7b.
        #[arg(long)]
        synthetic: Option<String>,
        /// Synthetic models: build only this many decoder layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Prompt tokens prefilled before timing.
        #[arg(long, default_value_t = 16)]
        prompt: usize,
        /// Decode steps timed.
        #[arg(long, default_value_t = 16)]
        tokens: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// Round to nearest (the MBQ reference quantizer, no calibration).
    Rtn,
    /// Modality-balanced quantization (not implemented yet).
    Mbq,
    /// AWQ (not implemented yet).
    Awq,
    /// SmoothQuant (not implemented yet).
    Smoothquant,
}

fn main() -> ExitCode {
    match real_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Devices => {
            println!("cpu: {} threads", rayon::current_num_threads());
            #[cfg(feature = "cuda")]
            match mbq::backend::cuda::devices() {
                Ok(names) => names
                    .iter()
                    .enumerate()
                    .for_each(|(i, n)| println!("cuda:{i}: {n}")),
                Err(e) => println!("cuda: {e}"),
            }
            #[cfg(not(feature = "cuda"))]
            println!("cuda: not compiled in (build with --features cuda)");
            let adapters = mbq::backend::wgpu::adapters();
            if adapters.is_empty() {
                println!("wgpu: no adapter (no Vulkan, Metal or DX12 driver)");
            }
            for (i, a) in adapters.iter().enumerate() {
                println!("wgpu:{i}: {}", a.summary());
            }
            Ok(())
        }
        Cmd::Inspect { model } => {
            let cfg = mbq::config::VlmConfig::load(&model)?;
            println!("{cfg:#?}");
            Ok(())
        }
        Cmd::Quantize {
            method,
            w_bit,
            group_size,
            model,
            out,
        } => quantize(method, w_bit, group_size, &model, &out),
        Cmd::Shapes { seed, count, out } => {
            let s = mbq::shapes::write_dataset(seed, count, &out)?;
            println!(
                "{}: {} images, {} questions (seed {seed})",
                s.out.display(),
                s.images,
                s.questions
            );
            Ok(())
        }
        Cmd::Eval {
            model,
            data,
            image_folder,
            backend,
            adapter,
            limit,
            max_new_tokens,
            json,
        } => eval(
            mbq::eval::EvalRequest {
                model: mbq::runtime::resolve_model(Some(&model), |m| eprintln!("{m}"))?,
                image_folder: image_folder.unwrap_or_else(|| match data.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => std::path::PathBuf::from("."),
                }),
                data,
                backend,
                adapter,
                limit,
                max_new_tokens,
            },
            json,
        ),
        Cmd::Bench { what } => {
            let backend = match &what {
                BenchCmd::Gemv { backend, .. } | BenchCmd::Decode { backend, .. } => {
                    backend.clone()
                }
            };
            // A comma list runs each backend in turn, one table each.
            for b in backend.split(',') {
                match b.trim() {
                    "cpu" => bench_on(&mbq::backend::cpu::Cpu, "cpu", &what)?,
                    "wgpu" => {
                        let opts = mbq::runtime::wgpu_options(None, true);
                        let be = mbq::backend::wgpu::Wgpu::new(&opts)?;
                        let name = format!("wgpu ({})", be.adapter());
                        bench_on(&be, &name, &what)?
                    }
                    other => anyhow::bail!(
                        "--backend {other}: not available for benchmarks in this build; available: cpu, wgpu"
                    ),
                }
            }
            Ok(())
        }
    }
}

/// Runs a benchmark on one backend and prints its table (or JSON).
fn bench_on<B: mbq::backend::Backend>(be: &B, name: &str, what: &BenchCmd) -> anyhow::Result<()> {
    use mbq::bench;
    match what {
        BenchCmd::Gemv {
            shapes,
            iters,
            reps,
            rotate_mib,
            json,
            ..
        } => {
            let mut rows = Vec::new();
            for (inp, out) in bench::parse_shapes(&shapes)? {
                eprintln!("gemv {inp}x{out} on {name} ...");
                rows.extend(bench::bench_gemv(
                    be,
                    inp,
                    out,
                    *iters,
                    *reps,
                    *rotate_mib << 20,
                )?);
            }
            if *json {
                let timing = bench::timing_of(rows.iter().map(|r| r.timing));
                println!(
                    "{}",
                    serde_json::json!({"backend": name, "timing": timing, "gemv": rows})
                );
            } else {
                print!("{}", bench::gemv_table(name, &rows));
            }
        }
        BenchCmd::Decode {
            model,
            synthetic,
            layers,
            prompt,
            tokens,
            json,
            ..
        } => {
            let note = |m: &str| eprintln!("{m}");
            let (label, rows) = match (model, synthetic) {
                (Some(dir), None) => (
                    dir.display().to_string(),
                    bench::decode_model_dir(be, dir, *prompt, *tokens, note)?,
                ),
                (None, Some(s)) => (
                    s.clone(),
                    bench::decode_synthetic(be, s, *layers, *prompt, *tokens, note)?,
                ),
                _ => anyhow::bail!("bench decode: give --model DIR or --synthetic NAME"),
            };
            if *json {
                let timing = bench::timing_of(rows.iter().map(|r| r.timing));
                println!(
                    "{}",
                    serde_json::json!({"backend": name, "model": label, "timing": timing, "decode": rows})
                );
            } else {
                print!("{}", bench::decode_table(name, &label, &rows));
            }
        }
    }
    Ok(())
}

fn eval(req: mbq::eval::EvalRequest, json: bool) -> anyhow::Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};

    let bar = ProgressBar::hidden();
    let report = mbq::eval::run(
        &req,
        |m| eprintln!("{m}"),
        |done, total| {
            if bar.is_hidden() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(total as u64);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} questions {elapsed} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            }
            bar.set_position(done as u64);
        },
    );
    bar.finish_and_clear();
    let r = report?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{} on {} ({}): accuracy {:.4} ({}/{}), short answers {:.4}, {:.1} s",
        r.model,
        r.backend,
        r.device,
        r.accuracy,
        r.correct,
        r.count,
        r.short_answer_accuracy,
        r.seconds
    );
    for (t, s) in &r.per_type {
        println!("  {t:<10} {:.4} ({}/{})", s.accuracy, s.correct, s.count);
    }
    match r.caption_perplexity {
        Some(p) => println!(
            "  caption perplexity {p:.4} over {} tokens",
            r.caption_tokens
        ),
        None => println!("  caption perplexity: no caption questions"),
    }
    Ok(())
}

fn quantize(
    method: Method,
    bits: u32,
    group_size: usize,
    model: &std::path::Path,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    use mbq::quant::writer::{quantize_rtn_dir, Progress};

    if method != Method::Rtn {
        anyhow::bail!(
            "--method {}: mbq, awq, smoothquant are not implemented yet; available: rtn",
            format!("{method:?}").to_lowercase()
        );
    }
    let t0 = std::time::Instant::now();
    let bar = ProgressBar::hidden();
    let report = quantize_rtn_dir(model, out, bits, group_size, |p| match p {
        Progress::Start { linears } => {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(linears as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} linears {elapsed} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
        }
        Progress::Packed { done, name, .. } => {
            bar.set_position(done as u64);
            bar.set_message(name.to_string());
        }
        Progress::Writing => bar.set_message("writing model.safetensors"),
    });
    bar.finish_and_clear();
    let report = report?;
    let mb = |b: f64| b / 1e6;
    println!(
        "{}: packed {} linears ({} weights, W{bits} g{group_size}) {:.2} MB -> {:.2} MB = {:.3} bits/weight; \
         model.safetensors {:.2} MB -> {:.2} MB; {} tensors and {} files copied; {:.2} s",
        report.output.display(),
        report.packed.len(),
        report.packed_weights,
        mb(report.packed_bytes_before as f64),
        mb(report.packed_bytes_after as f64),
        report.bits_per_weight(),
        mb(report.weight_file_bytes_before as f64),
        mb(report.weight_file_bytes_after as f64),
        report.copied_tensors,
        report.copied_files.len(),
        t0.elapsed().as_secs_f64()
    );
    for f in &report.skipped_files {
        eprintln!("note: {} not copied (another weight format)", f.display());
    }
    Ok(())
}
