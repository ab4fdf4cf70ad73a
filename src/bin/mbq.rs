//! `mbq`: the project's tools as subcommands (more arrive with quantization,
//! calibration and benchmarking).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
            Ok(())
        }
        Cmd::Inspect { model } => {
            let cfg = mbq::config::VlmConfig::load(&model)?;
            println!("{cfg:#?}");
            Ok(())
        }
    }
}
