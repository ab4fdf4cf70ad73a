//! `mbq-run`: run a vision-language model on an image and a prompt, or
//! chat with it (`--chat`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use mbq::backend::{Backend, BackendJob, BackendKind};
use mbq::chat::ChatSession;
use mbq::generate::{GenerateOptions, Generation, SamplingDefaults};
use mbq::image_processor::ImageProcessor;
use mbq::preprocess::{load_image, Preprocessed};
use mbq::runtime::{run, Request};

/// Run a Hugging Face VLM directory (LLaVA, LLaVA-OneVision) on an image,
/// or chat with it.
#[derive(Parser, Debug)]
#[command(name = "mbq-run", version)]
struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json, ...), or a
    /// bundled model: tiny-shapes-w3 (the default: MBQ W3 g128), tiny-shapes (f16).
    #[arg(short = 'm', long)]
    model: Option<String>,
    /// Image file (PNG, JPEG, ...). Without it the prompt is text only.
    /// With --chat: attached to the first message.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The user's message (required unless --chat; with --chat, the first
    /// message).
    #[arg(short = 'p', long, required_unless_present = "chat")]
    prompt: Option<String>,
    /// A system message before the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Chat in the terminal: each stdin line is a message (`/image PATH`
    /// attaches an image to the next one, `/reset` starts over, `/quit`
    /// or end of input ends).
    #[arg(long, conflicts_with = "json")]
    chat: bool,
    /// The most tokens generated per answer.
    #[arg(
        short = 'n',
        long,
        default_value_t = 128,
        allow_negative_numbers = true
    )]
    max_new_tokens: usize,
    /// 0 = greedy. Default: the model's generation_config.json (greedy
    /// unless it has do_sample true).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Default: generation_config.json's, else 1.0.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = off). Default:
    /// generation_config.json's (50 when it samples without one), else off.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
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
    // Packed rows with int8 activations where the CPU has the integer
    // kernels (see `mbq::backend::cpu::Isa`); MBQ_CPU_ISA=avx512 keeps f32.
    mbq::backend::cpu::set_int8_activations(true);
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
    if let Some(t) = args.temperature {
        if t.is_nan() || t < 0.0 {
            anyhow::bail!("--temperature must be >= 0, got {t}");
        }
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            anyhow::bail!("--top-p must be in (0, 1], got {p}");
        }
    }
    let model = mbq::runtime::resolve_model(args.model.as_deref(), |m| eprintln!("{m}"))?;
    let mut options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        ..GenerateOptions::default()
    };
    // A missing model directory is reported by the load, with its files.
    if model.is_dir() {
        SamplingDefaults::load(&model)?.apply(
            &mut options,
            args.temperature,
            args.top_p,
            args.top_k,
        );
    }
    if args.chat {
        return chat(args, model, options);
    }
    let req = Request {
        model,
        image: args.image,
        prompt: args.prompt.unwrap_or_default(),
        system: args.system,
        options,
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
        "[{}] load {:.0} ms | {t} | stop: {}",
        resp.backend, resp.load_ms, g.stop
    );
    Ok(())
}

/// `--chat`: opens the backend and runs [`ChatJob`] on it.
fn chat(args: Args, model: PathBuf, options: GenerateOptions) -> anyhow::Result<()> {
    let be =
        mbq::runtime::open_backend(args.backend, args.adapter.as_deref(), |n| eprintln!("{n}"))?;
    be.run(ChatJob {
        model,
        system: args.system,
        first_prompt: args.prompt,
        first_image: args.image,
        options,
    })?;
    Ok(())
}

struct ChatJob {
    model: PathBuf,
    system: Option<String>,
    first_prompt: Option<String>,
    first_image: Option<PathBuf>,
    options: GenerateOptions,
}

const CHAT_HELP: &str =
    "a line is a message; /image PATH attaches an image to the next one, /reset starts over, /quit ends";

impl BackendJob for ChatJob {
    type Output = ();
    fn run<B: Backend>(self, be: &B, _device: &str) -> mbq::Result<()> {
        let t0 = std::time::Instant::now();
        let (model, proc) = mbq::runtime::load_model(be, &self.model)?;
        let mut session = ChatSession::new(be, &model, &proc).with_system(self.system.as_deref());
        let interactive = std::io::stdin().is_terminal();
        eprintln!(
            "[{}] loaded {} in {:.0} ms; {CHAT_HELP}",
            be.name(),
            self.model.display(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        let mut images = Images {
            dir: &self.model,
            cfg: None,
            pending: Vec::new(),
        };
        if let Some(path) = &self.first_image {
            // As in one-shot mode, a bad --image is an error.
            let pre = images.load(path)?;
            images.pending.push(pre);
        }
        if let Some(prompt) = &self.first_prompt {
            user_turn(
                &mut session,
                prompt,
                &mut images.pending,
                &self.options,
                be.name(),
            );
        }
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            if interactive {
                eprint!("> ");
                let _ = std::io::stderr().flush();
            }
            let line = match lines.next() {
                None => break,
                Some(Ok(line)) => line,
                Some(Err(e)) => {
                    eprintln!("error: reading stdin: {e}");
                    break;
                }
            };
            let line = line.trim_end_matches(['\r', '\n']);
            let (cmd, rest) = match line.trim_start().split_once(char::is_whitespace) {
                Some((c, r)) => (c, r.trim()),
                None => (line.trim(), ""),
            };
            match cmd {
                "" => continue,
                "/quit" | "/exit" => break,
                "/help" => eprintln!("{CHAT_HELP}"),
                "/reset" => {
                    session.reset();
                    let dropped = images.pending.len();
                    images.pending.clear();
                    if dropped > 0 {
                        eprintln!("conversation cleared ({dropped} attached image(s) dropped)");
                    } else {
                        eprintln!("conversation cleared");
                    }
                }
                "/image" if rest.is_empty() => eprintln!("error: /image needs a file: /image PATH"),
                "/image" => match images.load(Path::new(rest)) {
                    Ok(pre) => {
                        images.pending.push(pre);
                        eprintln!(
                            "attached {rest} ({} image(s) for the next message)",
                            images.pending.len()
                        );
                    }
                    Err(e) => eprintln!("error: {e}"),
                },
                _ => user_turn(
                    &mut session,
                    line,
                    &mut images.pending,
                    &self.options,
                    be.name(),
                ),
            }
        }
        Ok(())
    }
}

/// The chat's image loading: the model's image processor (read at the
/// first image) and the images attached to the next message.
struct Images<'a> {
    dir: &'a Path,
    cfg: Option<ImageProcessor>,
    pending: Vec<Preprocessed>,
}

impl Images<'_> {
    fn load(&mut self, path: &Path) -> mbq::Result<Preprocessed> {
        let cfg = match &mut self.cfg {
            Some(cfg) => cfg,
            none => none.insert(ImageProcessor::load(self.dir)?),
        };
        cfg.preprocess(&load_image(path)?)
    }
}

/// One message: streams the answer to stdout; errors go to stderr and the
/// chat goes on (the attached images stay attached).
fn user_turn<B: Backend>(
    session: &mut ChatSession<'_, B>,
    text: &str,
    pending: &mut Vec<Preprocessed>,
    opts: &GenerateOptions,
    backend: &str,
) {
    let mut stdout = std::io::stdout();
    let mut streamed = false;
    let result = session.turn(text, pending, opts, |t| {
        streamed = true;
        let _ = stdout.write_all(t.as_bytes());
        let _ = stdout.flush();
    });
    // An answer cut by an error still ends its line.
    if streamed && result.is_err() {
        println!();
    }
    match result {
        Ok(g) => {
            pending.clear();
            println!();
            report(&g, backend);
            if g.stop == "context" {
                eprintln!(
                    "the conversation has filled the model's context ({} tokens): /reset to start over",
                    session.cache_capacity()
                );
            }
        }
        Err(e @ mbq::Error::ContextLength { .. }) => {
            eprintln!("error: {e}");
            eprintln!("the conversation no longer fits the model's context: /reset to start over");
        }
        Err(e) => eprintln!("error: {e}"),
    }
}

fn report(g: &Generation, backend: &str) {
    let t = &g.timings;
    eprintln!(
        "[{backend}] prompt {} tok ({} reused) | {t} | stop: {}",
        g.prompt_tokens,
        g.prompt_tokens - t.prefill_tokens,
        g.stop
    );
}
