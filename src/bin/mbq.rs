//! `mbq`: the project's tools as subcommands (`quantize`; more arrive with
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
    /// What a model holds: architecture, sizes, weight dtypes,
    /// quantization (mbq.* metadata), calibration report, files.
    Inspect {
        /// Model directory, or a bundled model name (tiny-shapes, tiny-shapes-w3).
        #[arg(value_name = "DIR|NAME", required_unless_present = "model")]
        dir: Option<String>,
        /// The same as DIR|NAME.
        #[arg(long, conflicts_with = "dir", hide = true)]
        model: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Quantize a model's decoder linears into the packed format (a new
    /// directory; nothing is overwritten). rtn needs no data; mbq, awq and
    /// smoothquant calibrate on --calib first.
    Quantize {
        /// Quantization method.
        #[arg(long, value_enum, default_value_t = mbq::calib::Method::Rtn)]
        method: mbq::calib::Method,
        /// Weight bits: 3, 4 or 8 (4 with --a-bit 8).
        #[arg(long)]
        w_bit: u32,
        /// Activation bits: 8 for W4A8 (per-channel INT4 weights, per-token
        /// INT8 activations); weight-only when absent.
        #[arg(long)]
        a_bit: Option<u32>,
        /// Input features per (scale, zero) group: 32, 64 or 128.
        #[arg(long, default_value_t = 128)]
        group_size: usize,
        /// Calibration data: LLaVA JSON or JSONL (mbq, awq, smoothquant).
        #[arg(long)]
        calib: Option<std::path::PathBuf>,
        /// Folder the calibration "image" paths are relative to (default:
        /// the calibration file's folder).
        #[arg(long)]
        image_folder: Option<std::path::PathBuf>,
        /// Calibration samples, drawn after a seeded shuffle.
        #[arg(long, default_value_t = 128)]
        n_samples: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Reconstruction loss of the scale search.
        #[arg(long, value_enum, default_value_t = mbq::calib::LossKind::Mae)]
        loss: mbq::calib::LossKind,
        /// Where the scale search runs: cpu, wgpu, cuda or auto (MBQ's
        /// sensitivity pass runs there too).
        #[arg(long, default_value = "cpu")]
        backend: mbq::backend::BackendKind,
        /// Continue an interrupted calibration from its checkpoint.
        #[arg(long)]
        resume: bool,
        /// The scale search makes each layer's FP features for at most this
        /// many calibration tokens at a time (whole samples): lower it when
        /// the device runs out of memory (a 7B model's features take about
        /// 150 KB a token); the result is the same.
        #[arg(long, default_value_t = 8192)]
        search_chunk_tokens: usize,
        /// How calibration keeps the samples' layer inputs and the search's
        /// features between steps, and the dtype of the grid points'
        /// products' operands (sums are f32): auto (f16 when the language
        /// model is stored in f16, as its own forward computes; else f32),
        /// f16 (half the memory and bytes read) or f32.
        #[arg(long, value_enum, default_value_t = mbq::calib::kept::FeatureDtype::Auto)]
        feature_dtype: mbq::calib::kept::FeatureDtype,
        /// Testing aid: stop after this layer's checkpoint, as a kill would.
        #[arg(long, hide = true)]
        stop_after_layer: Option<usize>,
        /// Input model directory (read only).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Output directory; must not exist.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Rewrite an mbq quantized model directory in a format other runtimes
    /// load (a new directory; nothing is overwritten): gptq (GPTQ v1: vLLM,
    /// transformers with optimum + gptqmodel) or compressed-tensors
    /// (pack-quantized: vLLM, transformers). Weight-only models go to
    /// either; W4A8 to compressed-tensors only. The scheme is the model's.
    Export {
        /// gptq or compressed-tensors.
        #[arg(long)]
        format: mbq::quant::export::ExportFormat,
        /// The mbq quantized model directory (read only).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Output directory; must not exist.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Check this machine's backends against the CPU reference: the same
    /// prompt on each (greedy ids, per-step top-1 teacher-forced on the
    /// CPU's ids, largest relative logit difference) and, with --ops,
    /// every kernel. Exits non-zero on any failure.
    Verify {
        /// Model directory or bundled model name (default: the bundled
        /// model).
        #[arg(long)]
        model: Option<String>,
        /// Backends, comma-separated (cpu, wgpu, cuda); default: every
        /// backend built in and available here. A named backend that is
        /// not available is an error.
        #[arg(long)]
        backends: Option<String>,
        /// Image (default: examples/s1000_000000.png).
        #[arg(long)]
        image: Option<std::path::PathBuf>,
        /// Prompt.
        #[arg(long, default_value = mbq::verify::DEFAULT_PROMPT)]
        prompt: String,
        /// Also check every kernel family against the CPU.
        #[arg(long)]
        ops: bool,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve the model over HTTP with the OpenAI chat-completions API
    /// (images as base64 data URLs, streaming, batched concurrent requests).
    Serve {
        /// Model directory or bundled model name (default: the bundled
        /// model, as mbq-run).
        #[arg(long)]
        model: Option<String>,
        /// The model id clients send as `model` (default: the directory's name).
        #[arg(long)]
        model_id: Option<String>,
        /// auto, cpu, wgpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: mbq::backend::BackendKind,
        /// wgpu: the adapter whose name contains NAME (see `mbq devices`).
        #[arg(long, value_name = "NAME")]
        adapter: Option<String>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 0 picks a free port (the start-up line on stderr names it).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Most requests decoded together; more wait in a queue.
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Most images in one request.
        #[arg(long, default_value_t = 4)]
        max_images: usize,
        /// Largest request body in bytes (413 above it).
        #[arg(long, default_value_t = mbq::serve::DEFAULT_BODY_LIMIT)]
        max_body_bytes: usize,
        /// Let requests name image files under DIR (absolute paths or
        /// file:// URLs); without it only data: URLs are accepted.
        #[arg(long, value_name = "DIR")]
        allow_local_files: Option<std::path::PathBuf>,
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
        /// Also list every wrong answer: id, type, expected, generated
        /// (a "misses" array with --json).
        #[arg(long)]
        misses: bool,
    },
    /// Benchmarks: fused packed GEMV vs dense f16, and decode tokens/s.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Write a random-weight model directory laid out exactly like a real
    /// hub checkpoint (tensor names, shapes, dtype, shards, configs; a
    /// stand-in tokenizer with the real special-token ids), to measure
    /// memory and time at real size.
    Synth {
        /// llava-ov-0.5b (llava-hf/llava-onevision-qwen2-0.5b-ov-hf),
        /// llava-ov-7b (llava-hf/llava-onevision-qwen2-7b-ov-hf),
        /// llava-1.5-7b (llava-hf/llava-1.5-7b-hf), qwen2-vl-7b
        /// (Qwen/Qwen2-VL-7B-Instruct) or internvl3-8b
        /// (OpenGVLab/InternVL3-8B-hf); the hub id works too.
        #[arg(long, value_name = "NAME")]
        like: String,
        /// Output directory; must not exist.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Seed of the random values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep only N decoder layers (real widths; shards follow).
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
        /// f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// Keep only N vision-tower layers (quick runs, tests).
        #[arg(long, value_name = "N", hide = true)]
        vision_layers: Option<usize>,
        /// Embedding / lm_head rows (tests only: the tokenizer keeps the
        /// real ids, so prompts then tokenize beyond the embeddings).
        #[arg(long, value_name = "N", hide = true)]
        vocab: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// W3 and W4 (g128) fused dequant-GEMV against a dense f16 GEMV.
    /// Timed with GPU timestamps where the backend has them (wgpu with
    /// TIMESTAMP_QUERY), else wall clock; the wall clock is kept too.
    Gemv {
        /// Backends, comma-separated (cpu, wgpu, cuda): side by side.
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
    /// The server's engine under 1, 4, 8 concurrent requests: tokens/s over
    /// all requests, batched against one request at a time.
    Serve {
        /// Backends, comma-separated (cpu, wgpu, cuda): one table each.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Model directory or bundled model name (default: the bundled model).
        #[arg(long)]
        model: Option<String>,
        /// Image of every request (default: examples/s1000_000000.png).
        #[arg(long)]
        image: Option<std::path::PathBuf>,
        #[arg(long, default_value = "Describe the image.")]
        prompt: String,
        /// Concurrency levels, comma-separated.
        #[arg(long, default_value = "1,4,8")]
        concurrency: String,
        /// New tokens per request (EOS ignored).
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Rounds per level.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long)]
        json: bool,
    },
    Decode {
        /// Backends, comma-separated (cpu, wgpu, cuda): side by side.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// A model directory (its language model is benchmarked).
        #[arg(long, conflicts_with = "synthetic")]
        model: Option<std::path::PathBuf>,
        /// A synthetic model of a real shape: llava-ov-7b, llava-1.5-7b,
        /// qwen2-vl-7b (Qwen2-VL-7B-Instruct) or internvl3-8b (InternVL3-8B-hf).
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
        /// Weight kinds, comma-separated, in this order: f16 (the model's
        /// dense weights as stored), w3, w4 (group 128; RTN for --model).
        #[arg(long, default_value = "f16,w3,w4")]
        weights: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    mbq::runtime::quiet_headless_vulkan();
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
            match mbq::backend::cuda::devices() {
                Ok(names) => names
                    .iter()
                    .enumerate()
                    .for_each(|(i, n)| println!("cuda:{i}: {n}")),
                Err(e) => println!("cuda: {e}"),
            }
            let adapters = mbq::backend::wgpu::adapters();
            if adapters.is_empty() {
                println!("wgpu: no adapter (no Vulkan, Metal or DX12 driver)");
            }
            for (i, a) in adapters.iter().enumerate() {
                println!("wgpu:{i}: {}", a.summary());
            }
            Ok(())
        }
        Cmd::Inspect { dir, model, json } => {
            let name = dir.or(model);
            let dir = mbq::runtime::resolve_model(name.as_deref(), |m| eprintln!("{m}"))?;
            let i = mbq::inspect::inspect(&dir)?;
            if json {
                println!("{}", serde_json::to_string(&i)?);
            } else {
                print!("{}", i.text());
            }
            Ok(())
        }
        Cmd::Quantize {
            method,
            w_bit,
            a_bit,
            group_size,
            calib,
            image_folder,
            n_samples,
            seed,
            loss,
            backend,
            resume,
            search_chunk_tokens,
            feature_dtype,
            stop_after_layer,
            model,
            out,
        } => quantize(mbq::calib::QuantizeOptions {
            method,
            w_bit,
            a_bit,
            group_size,
            image_folder: image_folder.or_else(|| {
                calib.as_ref().map(|c| match c.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => std::path::PathBuf::from("."),
                })
            }),
            calib,
            n_samples,
            seed,
            loss,
            model: mbq::runtime::resolve_model(Some(&model.to_string_lossy()), |m| {
                eprintln!("{m}")
            })?,
            out,
            backend,
            resume,
            stop_after_layer,
            search_chunk_tokens,
            feature_dtype,
        }),
        Cmd::Export { format, model, out } => export(format, &model, &out),
        Cmd::Verify {
            model,
            backends,
            image,
            prompt,
            ops,
            json,
        } => {
            // A bad --backends is reported before anything is loaded.
            let backends = backends
                .as_deref()
                .map(mbq::verify::parse_backends)
                .transpose()?;
            let req = mbq::verify::VerifyRequest {
                model: mbq::runtime::resolve_model(model.as_deref(), |m| eprintln!("{m}"))?,
                image: match image {
                    Some(p) => p,
                    None => mbq::verify::default_image()?,
                },
                prompt,
                backends,
                ops,
                options: mbq::backend::BackendOptions::default(),
            };
            let report = mbq::verify::verify(&req, |m| eprintln!("{m}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            if !report.ok {
                anyhow::bail!("verify: some checks failed (see the FAIL lines above)");
            }
            Ok(())
        }
        Cmd::Serve {
            model,
            model_id,
            backend,
            adapter,
            host,
            port,
            max_batch,
            max_images,
            max_body_bytes,
            allow_local_files,
        } => {
            // The runtime: packed rows with int8 activations where the CPU
            // has the integer kernels (see `mbq::backend::cpu::Isa`).
            mbq::backend::cpu::set_int8_activations(true);
            let dir = mbq::runtime::resolve_model(model.as_deref(), |m| eprintln!("{m}"))?;
            let model_id = model_id.unwrap_or_else(|| {
                std::fs::canonicalize(&dir)
                    .unwrap_or_else(|_| dir.clone())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
            mbq::serve::serve(
                mbq::serve::ServeOptions {
                    model: dir,
                    model_id,
                    backend,
                    backend_options: mbq::backend::BackendOptions { adapter },
                    host,
                    port,
                    max_batch,
                    max_images,
                    body_limit: max_body_bytes,
                    allow_local_files,
                },
                |m: &str| eprintln!("{m}"),
            )?;
            Ok(())
        }
        Cmd::Shapes { seed, count, out } => {
            let s = mbq::shapes::write_dataset(seed, count, &out)?;
            s.notes.iter().for_each(|n| eprintln!("{n}"));
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
            misses,
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
            misses,
        ),
        Cmd::Bench {
            what:
                BenchCmd::Serve {
                    backend,
                    model,
                    image,
                    prompt,
                    concurrency,
                    tokens,
                    reps,
                    json,
                },
        } => {
            mbq::backend::cpu::set_int8_activations(true);
            let levels = mbq::bench::serve::parse_levels(&concurrency)?;
            let model = mbq::runtime::resolve_model(model.as_deref(), |m| eprintln!("{m}"))?;
            let image = match image {
                Some(p) => p,
                None => mbq::bench::serve::default_image()?,
            };
            let info = mbq::bench::RunInfo::collect();
            let mut all = Vec::new();
            for b in backend.split(',') {
                let o = mbq::bench::serve::ServeBenchOptions {
                    model: model.clone(),
                    backend: b.trim().parse()?,
                    image: image.clone(),
                    prompt: prompt.clone(),
                    levels: levels.clone(),
                    tokens,
                    reps,
                };
                all.push(mbq::bench::serve::bench_serve(&o, |m: &str| {
                    eprintln!("{m}")
                })?);
            }
            if json {
                println!("{}", serde_json::json!({"run": info, "serve": all}));
            } else {
                println!("{}", info.header());
                for r in &all {
                    println!("{r}");
                }
            }
            Ok(())
        }
        Cmd::Synth {
            like,
            out,
            seed,
            layers,
            dtype,
            vision_layers,
            vocab,
        } => synth(&like, &out, seed, layers, &dtype, vision_layers, vocab),
        Cmd::Bench { what } => {
            mbq::backend::cpu::set_int8_activations(true);
            let backend = match &what {
                BenchCmd::Gemv { backend, .. } | BenchCmd::Decode { backend, .. } => {
                    backend.clone()
                }
                BenchCmd::Serve { .. } => anyhow::bail!("bench serve is run above"),
            };
            // Options checked before any backend starts.
            match &what {
                BenchCmd::Decode {
                    weights,
                    model,
                    synthetic,
                    layers,
                    prompt,
                    tokens,
                    ..
                } => {
                    mbq::bench::WeightKind::parse_list(weights)?;
                    match (model, synthetic) {
                        (None, Some(name)) => {
                            mbq::bench::synthetic_layers(name, *layers)?;
                        }
                        (Some(_), None) if layers.is_some() => {
                            anyhow::bail!("bench decode: --layers cuts a --synthetic model; a --model directory runs whole")
                        }
                        (Some(_), None) => {}
                        _ => anyhow::bail!("bench decode: give --model DIR or --synthetic NAME"),
                    }
                    if *prompt == 0 || *tokens == 0 {
                        anyhow::bail!("bench decode: --prompt and --tokens must be > 0");
                    }
                }
                BenchCmd::Gemv {
                    shapes,
                    iters,
                    reps,
                    ..
                } => {
                    mbq::bench::parse_shapes(shapes)?;
                    if *iters == 0 || *reps == 0 {
                        anyhow::bail!("bench gemv: --iters and --reps must be > 0");
                    }
                }
                BenchCmd::Serve { .. } => {}
            }
            // A comma list runs each backend in turn; the tables are printed
            // side by side at the end. With more than one, each backend's own
            // table also goes to stderr as soon as it is measured, so a run
            // cut short (a time limit, a later backend failing) still shows
            // what it measured.
            let info = mbq::bench::RunInfo::collect();
            let names: Vec<&str> = backend.split(',').map(str::trim).collect();
            let mut all = Vec::new();
            for b in &names {
                let out = bench_backend(b, &what, &info)?;
                if names.len() > 1 {
                    eprint!("{}", out.table());
                }
                all.push(out);
            }
            print_bench(&what, &info, all)
        }
    }
}

/// One backend's benchmark results.
enum BenchOut {
    Gemv(mbq::bench::Measured<mbq::bench::GemvResult>),
    Decode(String, mbq::bench::Measured<mbq::bench::DecodeResult>),
}

impl BenchOut {
    /// This backend's own table.
    fn table(&self) -> String {
        match self {
            BenchOut::Gemv(m) => mbq::bench::gemv_table(&m.backend, &m.rows),
            BenchOut::Decode(label, m) => mbq::bench::decode_table(&m.backend, label, &m.rows),
        }
    }
}

fn print_bench(
    what: &BenchCmd,
    info: &mbq::bench::RunInfo,
    all: Vec<BenchOut>,
) -> anyhow::Result<()> {
    use mbq::bench;
    let json = match what {
        BenchCmd::Gemv { json, .. }
        | BenchCmd::Decode { json, .. }
        | BenchCmd::Serve { json, .. } => *json,
    };
    let mut gemv = Vec::new();
    let mut decode = Vec::new();
    let mut label = String::new();
    for o in all {
        match o {
            BenchOut::Gemv(m) => gemv.push(m),
            BenchOut::Decode(l, m) => {
                label = l;
                decode.push(m)
            }
        }
    }
    if json {
        let rows: Vec<serde_json::Value> = gemv
            .iter()
            .map(|m| {
                let notes: Vec<serde_json::Value> = m
                    .rows
                    .iter()
                    .filter_map(|r| {
                        bench::cache_note(r, m.cache_bytes, &m.copy).map(|n| {
                            serde_json::json!({"in": r.inp, "out": r.out, "weights": r.weights, "note": n.text()})
                        })
                    })
                    .collect();
                serde_json::json!({"backend": m.backend, "device": m.device, "copy": m.copy,
                    "timing": bench::timing_of(m.rows.iter().map(|r| r.timing)), "gemv": m.rows,
                    "cache_notes": notes})
            })
            .chain(decode.iter().map(|m| {
                serde_json::json!({"backend": m.backend, "device": m.device, "model": label, "copy": m.copy,
                    "timing": bench::timing_of(m.rows.iter().map(|r| r.timing)), "decode": m.rows})
            }))
            .collect();
        let j = serde_json::json!({
            "mbq_version": env!("CARGO_PKG_VERSION"),
            "commit": info.commit,
            "date": info.date,
            "machine": info,
            "backends": rows,
        });
        println!("{j}");
        return Ok(());
    }
    print!("{}", info.header());
    for m in gemv
        .iter()
        .map(|m| (&m.backend, &m.device))
        .chain(decode.iter().map(|m| (&m.backend, &m.device)))
    {
        println!("{}: {}", m.0, m.1);
    }
    for m in &gemv {
        print!("{}", bench::gemv_table(&m.backend, &m.rows));
        print!("{}", bench::gemv_notes(m));
    }
    for m in &decode {
        print!("{}", bench::decode_table(&m.backend, &label, &m.rows));
    }
    println!();
    if !gemv.is_empty() {
        print!("{}", bench::gemv_side_by_side(&gemv));
    }
    if !decode.is_empty() {
        print!("{}", bench::decode_side_by_side(&label, &decode));
    }
    Ok(())
}

/// Opens the backend `--backend` names (`cpu`, `wgpu`, `cuda`: never
/// `auto`, a benchmark compares named backends) and benchmarks it.
fn bench_backend(
    name: &str,
    what: &BenchCmd,
    info: &mbq::bench::RunInfo,
) -> anyhow::Result<BenchOut> {
    use mbq::backend::{BackendKind, BackendOptions};
    let named = [BackendKind::Cpu, BackendKind::Wgpu, BackendKind::Cuda];
    let available: Vec<&str> = named
        .iter()
        .filter(|k| k.compiled_in())
        .map(|k| k.name())
        .collect();
    let Some(kind) = named
        .into_iter()
        .find(|k| k.name() == name && k.compiled_in())
    else {
        anyhow::bail!(
            "--backend {name}: not available for benchmarks in this build; available: {}",
            available.join(", ")
        );
    };
    let note = |m: &str| eprintln!("{m}");
    let be = mbq::backend::open(kind, &BackendOptions::default(), note)?;
    let (device, cache_bytes) = bench_device(&be, info);
    be.run(BenchJob {
        what,
        device,
        cache_bytes,
    })?
}

/// The device in full for the header (the CPU model and cores; the wgpu
/// adapter with its backend and driver; the CUDA device), and the
/// last-level cache the weights stream through when it is the host's.
fn bench_device(
    be: &mbq::backend::AnyBackend,
    info: &mbq::bench::RunInfo,
) -> (String, Option<u64>) {
    use mbq::backend::AnyBackend;
    match be {
        AnyBackend::Cpu(_) => (
            format!(
                "{}, {} cores, {} threads",
                info.cpu,
                info.cores,
                rayon::current_num_threads()
            ),
            info.l3_bytes,
        ),
        AnyBackend::Wgpu(_) => {
            let device = be.device();
            // The adapter's AdapterInfo as `mbq devices` reports it.
            let found = mbq::backend::wgpu::adapters()
                .into_iter()
                .find(|a| device.starts_with(&format!("{} (", a.name)));
            match found {
                Some(a) => (
                    format!(
                        "{} ({}, {}), driver {}",
                        a.name,
                        a.backend,
                        a.device_type,
                        if a.driver.is_empty() { "?" } else { &a.driver }
                    ),
                    // A CPU adapter (lavapipe) streams through the host's caches.
                    (!a.is_gpu).then_some(info.l3_bytes).flatten(),
                ),
                None => (device, None),
            }
        }
        AnyBackend::Cuda(_) => (be.device(), None),
    }
}

/// [`bench_on`] on the opened backend, named `kind (device)` (the CPU
/// just `cpu`).
struct BenchJob<'a> {
    what: &'a BenchCmd,
    device: String,
    cache_bytes: Option<u64>,
}

impl mbq::backend::BackendJob for BenchJob<'_> {
    type Output = anyhow::Result<BenchOut>;
    fn run<B: mbq::backend::Backend>(
        self,
        be: &B,
        device: &str,
    ) -> mbq::error::Result<anyhow::Result<BenchOut>> {
        let name = match be.name() {
            "cpu" => {
                let isa = mbq::backend::cpu::Isa::detect();
                eprintln!("cpu kernels: {}", isa.name());
                "cpu".to_string()
            }
            kind => format!("{kind} ({device})"),
        };
        Ok(bench_on(be, &name, self))
    }
}

/// Runs a benchmark on one backend (and its copy bandwidth).
fn bench_on<B: mbq::backend::Backend>(
    be: &B,
    name: &str,
    job: BenchJob<'_>,
) -> anyhow::Result<BenchOut> {
    use mbq::bench;
    let BenchJob {
        what,
        device,
        cache_bytes,
    } = job;
    eprintln!("device-to-device copy on {name} ...");
    let copy = bench::bench_copy(be, COPY_BYTES, 10, 5)
        .map_err(|e| eprintln!("copy benchmark on {name}: {e}"))
        .ok();
    Ok(match what {
        BenchCmd::Serve { .. } => anyhow::bail!("bench serve does not run through bench_on"),
        BenchCmd::Gemv {
            shapes,
            iters,
            reps,
            rotate_mib,
            ..
        } => {
            let mut rows = Vec::new();
            for (inp, out) in bench::parse_shapes(shapes)? {
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
            BenchOut::Gemv(bench::Measured {
                backend: name.to_string(),
                device,
                cache_bytes,
                copy,
                rows,
            })
        }
        BenchCmd::Decode {
            model,
            synthetic,
            layers,
            prompt,
            tokens,
            weights,
            ..
        } => {
            let note = |m: &str| eprintln!("{m}");
            let kinds = bench::WeightKind::parse_list(weights)?;
            let (label, rows) = match (model, synthetic) {
                (Some(dir), None) => (
                    dir.display().to_string(),
                    bench::decode_model_dir(be, dir, *prompt, *tokens, &kinds, note)?,
                ),
                (None, Some(s)) => (
                    s.clone(),
                    bench::decode_synthetic(be, s, *layers, *prompt, *tokens, &kinds, note)?,
                ),
                _ => anyhow::bail!("bench decode: give --model DIR or --synthetic NAME"),
            };
            BenchOut::Decode(
                label,
                bench::Measured {
                    backend: name.to_string(),
                    device,
                    cache_bytes,
                    copy,
                    rows,
                },
            )
        }
    })
}

/// Bytes of the copy that measures each backend's bandwidth ceiling.
const COPY_BYTES: usize = 128 << 20;

fn eval(req: mbq::eval::EvalRequest, json: bool, misses: bool) -> anyhow::Result<()> {
    let mut progress = mbq::progress::Progress::default();
    let report = mbq::eval::run(
        &req,
        |m| eprintln!("{m}"),
        |done, total| {
            progress.stage("answering", total, "questions");
            progress.set(done);
        },
    );
    progress.finish();
    let r = report?;
    let wrong: Vec<&mbq::eval::Answered> = r.answers.iter().filter(|a| !a.correct).collect();
    if json {
        let mut j = serde_json::to_value(&r)?;
        if misses {
            j["misses"] = serde_json::to_value(&wrong)?;
        }
        println!("{j}");
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
    if misses {
        println!("wrong answers ({}):", wrong.len());
        for a in wrong {
            println!(
                "  {} [{}] expected {:?}, generated {:?}",
                a.id, a.kind, a.answer, a.generated
            );
        }
    }
    Ok(())
}

fn synth(
    like: &str,
    out: &std::path::Path,
    seed: u64,
    layers: Option<usize>,
    dtype: &str,
    vision_layers: Option<usize>,
    vocab: Option<usize>,
) -> anyhow::Result<()> {
    use mbq::synth::{SynthOptions, SynthProgress};
    let like = mbq::synth::Like::parse(like)?;
    let opts = SynthOptions {
        dtype: mbq::synth::SynthDtype::parse(dtype)?,
        layers,
        vision_layers,
        vocab,
    };
    let plan = mbq::synth::plan(like, &opts)?;
    const MIB: u64 = 1 << 20;
    eprintln!(
        "{} like {}: {} tensors, {:.3} B parameters, {:.2} GB in {} file(s)",
        out.display(),
        like.hub_id(),
        plan.tensors.len(),
        plan.parameters() as f64 / 1e9,
        plan.total_bytes() as f64 / 1e9,
        plan.files.len()
    );
    let mut bar = mbq::progress::Progress::default();
    let report = mbq::synth::write(&plan, out, seed, |p| match p {
        SynthProgress::Start { total_bytes, .. } => {
            bar.stage("writing weights", total_bytes.div_ceil(MIB) as usize, "MiB")
        }
        SynthProgress::Bytes { done, .. } => bar.set((done / MIB) as usize),
        SynthProgress::Note(m) => bar.note(m),
    });
    bar.finish();
    let r = report?;
    println!(
        "wrote {}: {} tensors, {} parameters, {:.2} GB ({}), {:.1} s ({:.0} MB/s)",
        r.output.display(),
        r.tensors,
        r.parameters,
        r.bytes as f64 / 1e9,
        r.files.join(", "),
        r.seconds,
        r.bytes as f64 / 1e6 / r.seconds.max(1e-9)
    );
    Ok(())
}

fn quantize(o: mbq::calib::QuantizeOptions) -> anyhow::Result<()> {
    use mbq::calib::{quantize_model, CalibProgress};
    use mbq::quant::writer::Progress;

    let t0 = std::time::Instant::now();
    // Bars on a terminal; plain timestamped lines in a log.
    let mut bar = mbq::progress::Progress::default();
    let outcome = quantize_model(&o, |p| match p {
        CalibProgress::Note(m) => bar.note(&m),
        CalibProgress::Loading { done, total } => {
            bar.stage("encoding calibration images", total, "samples");
            bar.set(done);
        }
        CalibProgress::Sensitivity {
            done,
            total,
            tokens,
        } => {
            bar.stage(
                "sensitivity (forward and backward through the LM)",
                total,
                "layer passes",
            );
            bar.tokens_per_unit(tokens);
            bar.set(done);
        }
        CalibProgress::Layer {
            layer,
            layers,
            done,
            total,
            tokens,
            chunks,
        } => {
            // With the samples in chunks a unit is a grid point on a chunk.
            let (what, unit) = if chunks > 1 {
                let what = format!(
                    "layer {}/{layers} scale search ({chunks} chunks)",
                    layer + 1
                );
                (what, "grid points x chunks")
            } else {
                let what = format!("layer {}/{layers} scale search", layer + 1);
                (what, "grid points")
            };
            bar.stage(&what, total, unit);
            bar.tokens_per_unit(tokens);
            bar.set(done);
        }
        CalibProgress::Write(Progress::Start { linears }) => {
            bar.stage("packing", linears, "linears");
        }
        CalibProgress::Write(Progress::Packed { done, .. }) => bar.set(done),
        CalibProgress::Write(Progress::Writing) => {
            bar.message(&format!("writing {}", mbq::quant::format::MBQ_WEIGHTS_FILE))
        }
        CalibProgress::Write(Progress::Note(m)) => bar.note(m),
    });
    bar.finish();
    let outcome = outcome?;
    let report = &outcome.written;
    let mb = |b: f64| b / 1e6;
    let scheme = match o.a_bit {
        Some(a) => format!("W{}A{a} per-channel", o.w_bit),
        None => format!("W{} g{}", o.w_bit, o.group_size),
    };
    println!(
        "{}: {} packed {} linears ({} weights, {scheme}) {:.2} MB -> {:.2} MB = {:.3} bits/weight; \
         weights {:.2} MB -> {:.2} MB; {} tensors and {} files copied; {:.2} s",
        report.output.display(),
        if report.method == o.method.name() {
            report.method.clone()
        } else {
            format!("{} checkpoint repacked:", report.method)
        },
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
    if let Some(c) = &outcome.calibration {
        for l in &c.layers {
            let groups: Vec<String> = l
                .groups
                .iter()
                .map(|g| format!("{} alpha {:.2}", g.name, g.alpha))
                .collect();
            let ratio = l
                .ratio
                .as_ref()
                .map(|r| format!(" ratio attn {:.3} mlp {:.3};", r.attn, r.mlp))
                .unwrap_or_default();
            println!("  layer {}:{ratio} {}", l.index, groups.join(", "));
        }
        println!(
            "  report: {}/calibration_report.json and .svg",
            report.output.display()
        );
    }
    for f in &report.skipped_files {
        eprintln!("note: {} not copied (another weight format)", f.display());
    }
    Ok(())
}

fn export(
    format: mbq::quant::export::ExportFormat,
    model: &std::path::Path,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use mbq::quant::writer::Progress;
    let t0 = std::time::Instant::now();
    let mut bar = mbq::progress::Progress::default();
    let r = mbq::quant::export::export_dir(model, out, format, |p| match p {
        Progress::Start { linears } => bar.stage("converting", linears, "linears"),
        Progress::Packed { done, .. } => bar.set(done),
        Progress::Writing => bar.message("writing model.safetensors"),
        Progress::Note(m) => bar.note(m),
    });
    bar.finish();
    let r = r?;
    println!(
        "{}: {} ({}), {} linears converted, model.safetensors {:.2} MB; {} tensors and {} files copied, config.json with the format's quantization_config; {:.2} s",
        r.output.display(),
        r.format.name(),
        r.scheme,
        r.linears,
        r.weight_file_bytes as f64 / 1e6,
        r.copied_tensors,
        r.copied_files.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
