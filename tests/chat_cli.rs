//! `mbq-run --chat` with piped stdin on the bundled tiny-shapes-w3 model
//! (answers checked against the `mbq shapes --seed 1000` questions of the
//! example images), `ChatSession`'s cache reuse against fresh prefills,
//! the short options, `--system`, and the sampling defaults of
//! generation_config.json.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{copy_dir, scratch};
use mbq::backend::cpu::Cpu;
use mbq::chat::ChatSession;
use mbq::chat_template::{system_message, user_message};
use mbq::generate::{generate_chat, GenerateOptions};
use mbq::model::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig, Preprocessed};
use mbq::processor::Processor;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> PathBuf {
    repo().join("models/tiny-shapes-w3")
}

/// An example image (`mbq shapes --seed 1000`): s1000_000000 has a purple
/// circle, a green square and a blue cross; s1000_000003 a red cross and a
/// green circle; s1000_000009 one green circle.
fn example(stem: &str) -> String {
    repo()
        .join("examples")
        .join(format!("{stem}.png"))
        .to_string_lossy()
        .into_owned()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// mbq-run with `args` on the CPU, `stdin` piped in.
fn mbq_run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mbq-run"))
        .args(args)
        .args(["--backend", "cpu"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start mbq-run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs mbq-run expecting success: (stdout, stderr).
fn ok(args: &[&str], stdin: &str) -> (String, String) {
    let out = mbq_run(args, stdin);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "mbq-run {args:?} failed: {stderr}\nstdout: {stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

fn chat(extra: &[&str], stdin: &str) -> (Vec<String>, String) {
    let m = s(&model());
    let mut args = vec!["--chat", "-m", &m];
    args.extend_from_slice(extra);
    let (stdout, stderr) = ok(&args, stdin);
    (stdout.lines().map(str::to_string).collect(), stderr)
}

/// The "(N reused)" counts of the per-turn lines on stderr.
fn reused(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(" tok (")?;
            rest.split_once(" reused)")?.0.parse().ok()
        })
        .collect()
}

#[test]
fn chat_answers_turns_with_images_resets_and_quits() {
    let script = format!(
        "/image {}\nWhat color is the circle?\n/image {}\nWhat color is the cross?\n\
         /reset\n/image {}\nHow many shapes are there?\n/quit\nWhat color is the circle?\n",
        example("s1000_000000"),
        example("s1000_000003"),
        example("s1000_000009"),
    );
    let (answers, stderr) = chat(&[], &script);
    // Nothing but the answers on stdout; the line after /quit is not read.
    assert_eq!(answers, ["purple", "red", "1"], "{stderr}");
    assert!(stderr.contains("conversation cleared"), "{stderr}");
    // The prompt marker is for terminals only.
    assert!(!stderr.contains("> "), "{stderr}");
    // The second turn reuses the first turn's cache (its prompt and
    // answer); the turn after /reset only the template's opening.
    let r = reused(&stderr);
    assert_eq!(r.len(), 3, "{stderr}");
    assert_eq!(r[0], 0);
    assert!(
        r[1] > 70,
        "second turn should reuse the first's cache: {stderr}"
    );
    assert!(r[2] < 10, "{stderr}");
}

#[test]
fn chat_bad_image_is_reported_and_the_chat_goes_on() {
    let d = scratch("chat_bad_image");
    let not_png = d.join("notes.png");
    std::fs::write(&not_png, "this is not a PNG").unwrap();
    let script = format!(
        "/image /nonexistent/cat.png\n/image {}\n/image\n/image {}\nWhat color is the circle?\n",
        s(&not_png),
        example("s1000_000000"),
    );
    // No /quit: the end of input ends the chat.
    let (answers, stderr) = chat(&[], &script);
    assert_eq!(answers, ["purple"], "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("/nonexistent/cat.png")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("notes.png")),
        "{stderr}"
    );
    assert!(stderr.contains("/image needs a file"), "{stderr}");
    // Only the good image went with the message.
    assert!(
        stderr.contains("(1 image(s) for the next message)"),
        "{stderr}"
    );
    assert!(!stderr.contains("(2 image(s)"), "{stderr}");
}

#[test]
fn chat_first_turn_equals_one_shot() {
    let m = s(&model());
    for (stem, q) in [
        ("s1000_000000", "What color is the circle?"),
        ("s1000_000000", "Describe the image."),
        ("s1000_000003", "What shape is the red object?"),
        ("s1000_000009", "Is there a cross?"),
    ] {
        let img = example(stem);
        for system in [None, Some("You answer questions about shapes.")] {
            let mut one = vec![
                "-m",
                &m,
                "--image",
                &img,
                "-p",
                q,
                "-n",
                "12",
                "--ignore-eos",
            ];
            let mut chat_args = vec!["-n", "12", "--ignore-eos"];
            if let Some(sys) = system {
                one.extend(["--system", sys]);
                chat_args.extend(["--system", sys]);
            }
            let (expected, _) = ok(&one, "");
            let (answers, stderr) = chat(&chat_args, &format!("/image {img}\n{q}\n"));
            assert_eq!(answers.len(), 1, "{stderr}");
            assert_eq!(
                answers[0],
                expected.trim_end_matches('\n'),
                "{stem} {q:?} system {system:?}"
            );
        }
    }
}

#[test]
fn chat_prompt_and_image_options_are_the_first_turn() {
    let img = example("s1000_000000");
    let (answers, stderr) = chat(
        &["--image", &img, "-p", "What color is the circle?"],
        &format!(
            "/image {}\nWhat color is the cross?\n",
            example("s1000_000003")
        ),
    );
    assert_eq!(answers, ["purple", "red"], "{stderr}");
}

#[test]
fn chat_past_the_context_says_so_and_reset_recovers() {
    // Each image turn is ~82 tokens; the context is 512.
    let turn = format!(
        "/image {}\nWhat color is the cross?\n",
        example("s1000_000003")
    );
    let script = format!(
        "{}/reset\n/image {}\nWhat color is the circle?\n",
        turn.repeat(7),
        example("s1000_000000")
    );
    let (answers, stderr) = chat(&["-n", "4"], &script);
    assert_eq!(answers.len(), 7, "{stderr}");
    assert!(answers[..6].iter().all(|a| a == "red"), "{answers:?}");
    assert_eq!(answers[6], "purple", "{stderr}");
    assert!(
        stderr.contains("max_position_embeddings")
            && stderr.contains("no longer fits the model's context: /reset"),
        "{stderr}"
    );
}

#[test]
fn prompt_is_required_without_chat_and_json_conflicts_with_chat() {
    let out = mbq_run(&["--image", &example("s1000_000000")], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--prompt"), "{stderr}");
    let out = mbq_run(&["--chat", "--json"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--json") && stderr.contains("--chat"),
        "{stderr}"
    );
}

fn json(args: &[&str]) -> serde_json::Value {
    let (stdout, _) = ok(args, "");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn short_options_are_the_long_ones() {
    let (m, img) = (s(&model()), example("s1000_000003"));
    let q = "Describe the image.";
    let long = json(&[
        "--model",
        &m,
        "--image",
        &img,
        "--prompt",
        q,
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--json",
    ]);
    let short = json(&[
        "-m",
        &m,
        "--image",
        &img,
        "-p",
        q,
        "-n",
        "5",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(long["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(short["tokens"], long["tokens"]);
    assert_eq!(short["prompt_tokens"], long["prompt_tokens"]);
}

#[test]
fn system_message_is_in_the_prompt() {
    let (m, img) = (s(&model()), example("s1000_000000"));
    let base = [
        "-m",
        &m,
        "--image",
        &img,
        "-p",
        "What color is the circle?",
        "--json",
    ];
    let plain = json(&base);
    let mut with = base.to_vec();
    with.extend(["--system", "You are a helpful assistant."]);
    let sys = json(&with);
    let (a, b) = (
        plain["prompt_tokens"].as_u64().unwrap(),
        sys["prompt_tokens"].as_u64().unwrap(),
    );
    // "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n".
    assert!(b > a + 5, "prompt tokens {a} without, {b} with --system");
    assert_eq!(plain["text"], "purple");
}

/// A copy of the model whose generation_config.json is `cfg`.
fn model_with_generation_config(name: &str, cfg: &str) -> PathBuf {
    let d = scratch(name).join("model");
    copy_dir(&model(), &d);
    std::fs::write(d.join("generation_config.json"), cfg).unwrap();
    d
}

fn describe(model: &Path, extra: &[&str]) -> serde_json::Value {
    let (m, img) = (s(model), example("s1000_000000"));
    let mut args = vec![
        "-m",
        &m,
        "--image",
        &img,
        "-p",
        "Describe the image.",
        "-n",
        "16",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    json(&args)
}

#[test]
fn generation_config_sampling_defaults() {
    let greedy = describe(&model(), &[])["tokens"].clone();
    let sampling = model_with_generation_config(
        "gencfg_sample",
        r#"{"eos_token_id": 402, "do_sample": true, "temperature": 1.5, "top_k": 20}"#,
    );
    let a = describe(&sampling, &[])["tokens"].clone();
    let b = describe(&sampling, &[])["tokens"].clone();
    // The config's sampling is used: seeded, so the same twice, and not
    // the greedy answer.
    assert_eq!(a, b);
    assert_ne!(
        a, greedy,
        "do_sample true in generation_config.json should sample"
    );
    // Explicit flags win: --temperature 0 is greedy, and so is --top-k 1.
    assert_eq!(
        describe(&sampling, &["--temperature", "0"])["tokens"],
        greedy
    );
    assert_eq!(describe(&sampling, &["--top-k", "1"])["tokens"], greedy);
    // Another seed, other draws (the config still applies).
    let c = describe(&sampling, &["--seed", "3"])["tokens"].clone();
    assert_eq!(c, describe(&sampling, &["--seed", "3"])["tokens"]);

    // do_sample false: greedy whatever temperature says.
    let greedy_cfg = model_with_generation_config(
        "gencfg_greedy",
        r#"{"eos_token_id": 402, "do_sample": false, "temperature": 1.5}"#,
    );
    assert_eq!(describe(&greedy_cfg, &[])["tokens"], greedy);
    // An explicit temperature samples: the same draws as the sampling
    // config's at that temperature and top-k.
    assert_eq!(
        describe(&greedy_cfg, &["--temperature", "1.5", "--top-k", "20"])["tokens"],
        a
    );
}

#[test]
fn generation_config_bad_value_names_file_and_key() {
    let m = model_with_generation_config(
        "gencfg_bad",
        r#"{"eos_token_id": 402, "do_sample": true, "temperature": "hot"}"#,
    );
    let out = mbq_run(&["-m", &s(&m), "-p", "hi"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("generation_config.json") && stderr.contains("\"temperature\""),
        "{stderr}"
    );
    // An explicit --temperature does not hide a broken config.
    let out = mbq_run(&["-m", &s(&m), "-p", "hi", "--temperature", "0"], "");
    assert_eq!(out.status.code(), Some(1));
}

// ---------------------------------------------------------------------------
// ChatSession (the library)
// ---------------------------------------------------------------------------

struct Loaded {
    model: Vlm<Cpu>,
    proc: Processor,
    img_cfg: ImageProcessorConfig,
}

fn load() -> Loaded {
    let dir = model();
    let model = Vlm::load(&Cpu, &dir).unwrap();
    let proc = Processor::load(&dir, model.cfg.image_token_index).unwrap();
    let img_cfg = ImageProcessorConfig::load(&dir).unwrap();
    Loaded {
        model,
        proc,
        img_cfg,
    }
}

impl Loaded {
    fn image(&self, stem: &str) -> Preprocessed {
        preprocess(
            &self.img_cfg,
            &load_image(Path::new(&example(stem))).unwrap(),
        )
        .unwrap()
    }
}

fn opts(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        ignore_eos: true,
        ..GenerateOptions::default()
    }
}

#[test]
fn chat_session_reuses_the_cache_and_matches_a_fresh_prefill() {
    let l = load();
    let (img0, img3) = (l.image("s1000_000000"), l.image("s1000_000003"));
    let turns: [(&str, Vec<Preprocessed>); 3] = [
        ("What color is the circle?", vec![img0]),
        ("What color is the cross?", vec![img3]),
        ("Describe the image.", vec![]),
    ];
    // Short answers past EOS (the cache grows on the way), and answers to
    // EOS with room for the next turn (the cache is reused every turn).
    let mut reused_turns = 0;
    for o in [opts(6), GenerateOptions::default()] {
        let mut reuse = ChatSession::new(&Cpu, &l.model, &l.proc).with_system(Some("Be brief."));
        let mut fresh = ChatSession::new(&Cpu, &l.model, &l.proc).with_system(Some("Be brief."));
        for (i, (text, images)) in turns.iter().enumerate() {
            let capacity = reuse.cache_capacity();
            let mut streamed = String::new();
            let a = reuse
                .turn(text, images, &o, |t| streamed.push_str(t))
                .unwrap();
            assert_eq!(
                streamed, a.text,
                "turn {i}: the streamed text is the answer"
            );
            // The same conversation, its whole prompt prefilled.
            fresh.clear_cache();
            let b = fresh.turn(text, images, &o, |_| {}).unwrap();
            assert_eq!(a.tokens, b.tokens, "turn {i}");
            assert_eq!(a.prompt_tokens, b.prompt_tokens, "turn {i}");
            assert_eq!(b.timings.prefill_tokens, b.prompt_tokens, "turn {i}");
            println!(
                "turn {i}: prompt {} prefilled {} capacity {capacity} -> {}",
                a.prompt_tokens,
                a.timings.prefill_tokens,
                reuse.cache_capacity()
            );
            if capacity >= a.prompt_tokens + o.max_new_tokens {
                // The cache was big enough: only the new part was prefilled.
                assert_eq!(reuse.cache_capacity(), capacity);
                assert!(
                    a.timings.prefill_tokens < a.prompt_tokens / 2,
                    "turn {i}: prefilled {} of {} tokens",
                    a.timings.prefill_tokens,
                    a.prompt_tokens
                );
                reused_turns += 1;
            } else {
                // A bigger cache, all prefilled.
                assert!(reuse.cache_capacity() > capacity);
                assert_eq!(a.timings.prefill_tokens, a.prompt_tokens, "turn {i}");
            }
            // And the same as generate_chat on the rendered conversation.
            let mut msgs = reuse.messages();
            msgs.truncate(msgs.len() - 2);
            msgs.push(mbq::chat_template::user_message_images(text, images.len()));
            let all: Vec<Preprocessed> = turns[..=i].iter().flat_map(|t| t.1.clone()).collect();
            let refs: Vec<&Preprocessed> = all.iter().collect();
            let c = generate_chat(
                &Cpu,
                &l.model,
                &l.proc,
                &serde_json::Value::Array(msgs),
                &refs,
                &o,
                |_| {},
            )
            .unwrap();
            assert_eq!(a.tokens, c.tokens, "turn {i}: generate_chat");
        }
        assert_eq!(reuse.messages().len(), 7);
        assert_eq!(reuse.image_count(), 2);
    }
    assert!(reused_turns >= 3, "{reused_turns} turns reused the cache");
}

#[test]
fn chat_session_first_turn_and_reset() {
    let l = load();
    let img = l.image("s1000_000000");
    let o = GenerateOptions::default();
    let mut session = ChatSession::new(&Cpu, &l.model, &l.proc);
    let g = session
        .turn(
            "What color is the circle?",
            std::slice::from_ref(&img),
            &o,
            |_| {},
        )
        .unwrap();
    assert_eq!(g.text, "purple");
    assert_eq!(g.stop, "eos");
    assert_eq!(
        session.messages(),
        [
            user_message("What color is the circle?", true),
            mbq::chat_template::assistant_message("purple"),
        ]
    );
    // After a reset the conversation starts over; the cache is kept (the
    // template's opening is reused) and another image is not confused with
    // the first (both are image tokens).
    session.reset();
    assert!(session.messages().is_empty());
    let g = session
        .turn(
            "What color is the circle?",
            &[l.image("s1000_000009")],
            &o,
            |_| {},
        )
        .unwrap();
    assert_eq!(g.text, "green");
    assert!(g.timings.prefill_tokens < g.prompt_tokens);
    assert!(g.timings.prefill_tokens > 64, "the new image is prefilled");

    // A conversation past the context is an error and leaves it as it was.
    let long = "word ".repeat(600);
    let e = session.turn(&long, &[], &o, |_| {}).unwrap_err();
    assert!(matches!(e, mbq::Error::ContextLength { .. }), "{e}");
    assert_eq!(session.messages().len(), 2);
    let sys = ChatSession::new(&Cpu, &l.model, &l.proc).with_system(Some("S"));
    assert_eq!(sys.messages(), [system_message("S")]);
}
