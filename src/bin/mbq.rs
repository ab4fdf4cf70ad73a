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
    }
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
