//! `mbq-run`: run a vision-language model on an image and a prompt.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mbq::backend::BackendKind;
use mbq::generate::GenerateOptions;
use mbq::runtime::{run, Request};

/// Run a Hugging Face VLM directory (LLaVA, LLaVA-OneVision) on an image.
#[derive(Parser, Debug)]
#[command(name = "mbq-run", version)]
struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json, ...), or a
    /// bundled model: tiny-shapes-w3 (the default: MBQ W3 g128), tiny-shapes (f16).
    #[arg(long)]
    model: Option<String>,
    /// Image file (PNG, JPEG, ...). Without it the prompt is text only.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The user's message.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// wgpu: the adapter whose name contains NAME (see `mbq devices`).
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    mbq::runtime::quiet_headless_vulkan();
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    // NaN is refused too.
    if args.temperature.is_nan() || args.temperature < 0.0 {
        anyhow::bail!("--temperature must be >= 0, got {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    let model = mbq::runtime::resolve_model(args.model.as_deref(), |m| eprintln!("{m}"))?;
    let req = Request {
        model,
        image: args.image,
        prompt: args.prompt,
        options: GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            ignore_eos: args.ignore_eos,
        },
        backend: args.backend,
        adapter: args.adapter,
    };
    let json = args.json;
    let mut stdout = std::io::stdout();
    let resp = run(
        &req,
        |note| eprintln!("{note}"),
        |text| {
            if !json {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    let g = &resp.generation;
    let t = &g.timings;
    if json {
        let out = serde_json::json!({
            "text": g.text,
            "tokens": g.tokens,
            "prompt_tokens": g.prompt_tokens,
            "backend": resp.backend,
            "device": resp.device,
            "stop": g.stop,
            "timings": {
                "load_ms": resp.load_ms,
                "image_encode_ms": t.image_encode_ms,
                "prefill_ms": t.prefill_ms,
                "prefill_tokens": t.prefill_tokens,
                "prefill_tok_s": t.prefill_tok_s,
                "decode_ms": t.decode_ms,
                "decode_tokens": t.decode_tokens,
                "decode_tok_s": t.decode_tok_s,
            },
        });
        println!("{out}");
    } else {
        println!();
    }
    eprintln!(
        "[{}] load {:.0} ms | image encode {:.1} ms | prefill {} tok in {:.1} ms ({:.1} tok/s) | decode {} tok in {:.1} ms ({:.1} tok/s) | stop: {}",
        resp.backend,
        resp.load_ms,
        t.image_encode_ms,
        t.prefill_tokens,
        t.prefill_ms,
        t.prefill_tok_s,
        t.decode_tokens,
        t.decode_ms,
        t.decode_tok_s,
        g.stop
    );
    Ok(())
}
