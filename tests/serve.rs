//! `mbq serve` driven as a client drives it: the real binary on a free
//! local port, real HTTP requests (reqwest), JSON and server-sent events
//! parsed by client libraries (serde_json, eventsource-stream). The bundled
//! model answers "purple" for examples/s1000_000000.png.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{json, Value};

const QUESTION: &str = "What color is the circle?";

struct Server {
    child: Child,
    url: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mbq"))
            .args(["serve", "--backend", "cpu", "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mbq serve");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on ") {
                    let _ = tx.send(line[at + "listening on ".len()..].trim().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("mbq serve did not start: {:?}", stderr.lock().unwrap());
            }
        };
        Server { child, url, stderr }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image_url(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn ask(image: &str, text: &str) -> Value {
    json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url(image)}},
        {"type": "text", "text": text},
    ]}])
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

async fn post(s: &Server, body: &Value) -> (u16, Value) {
    let r = client()
        .post(s.at("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The data of every event of a streamed response, `[DONE]` included.
async fn post_stream(s: &Server, body: &Value) -> Vec<String> {
    let r = client()
        .post(s.at("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut events = r.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(e) = events.next().await {
        let e = e.unwrap();
        if !e.data.is_empty() {
            out.push(e.data);
        }
    }
    out
}

fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_plain_and_streamed() {
    let s = Server::start(&[]);
    let models: Value = client()
        .get(s.at("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-shapes-w3");

    let body = json!({"model": "tiny-shapes-w3", "messages": ask("s1000_000000.png", QUESTION)});
    let (status, r) = post(&s, &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], "purple");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let u = &r["usage"];
    assert_eq!(u["prompt_tokens"], 79, "{u}");
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = post_stream(&s, &body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(streamed_text(&events), "purple");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks.last().unwrap()["usage"], r["usage"]);

    // max_tokens cuts with finish_reason "length"; a stop string cuts the text.
    let body = json!({"messages": ask("s1000_000009.png", "Describe the image."), "max_tokens": 2, "ignore_eos": true});
    let (_, r) = post(&s, &body).await;
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 2);
    let full = json!({"messages": ask("s1000_000009.png", "Describe the image.")});
    let (_, r) = post(&s, &full).await;
    let text = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let word = text
        .split(' ')
        .nth(1)
        .expect("a description of several words");
    let mut cut = full.clone();
    cut["stop"] = json!([word]);
    let (_, r) = post(&s, &cut).await;
    let want = &text[..text.find(word).unwrap()];
    assert_eq!(r["choices"][0]["message"]["content"], want);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    cut["stream"] = json!(true);
    assert_eq!(streamed_text(&post_stream(&s, &cut).await), want);

    // Local files are refused without --allow-local-files.
    let (status, r) = post(
        &s,
        &json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}},
        ]}]}),
    )
    .await;
    assert_eq!(status, 403, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--allow-local-files"));

    // A multi-turn conversation with two images goes through the template.
    let two = json!({"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url("s1000_000003.png")}},
            {"type": "text", "text": QUESTION},
        ]},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url("s1000_000000.png")}},
            {"type": "text", "text": QUESTION},
        ]},
    ]});
    let (status, r) = post(&s, &two).await;
    assert_eq!(status, 200, "{r}");
    assert!(
        r["usage"]["prompt_tokens"].as_u64().unwrap() > 2 * 64,
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_match_one_at_a_time() {
    let s = Server::start(&["--max-batch", "8"]);
    let questions = [
        ("s1000_000000.png", QUESTION),
        ("s1000_000003.png", "What shape is it?"),
        ("s1000_000009.png", "Describe the image."),
        ("s1000_000003.png", QUESTION),
    ];
    let bodies: Vec<Value> = (0..16)
        .map(|i| {
            let (img, q) = questions[i % questions.len()];
            json!({"messages": ask(img, q), "max_tokens": 8 + i, "ignore_eos": true, "temperature": 0})
        })
        .collect();
    let mut alone = Vec::new();
    for b in &bodies {
        let (status, r) = post(&s, b).await;
        assert_eq!(status, 200, "{r}");
        alone.push(r["choices"][0]["message"]["content"].clone());
    }
    let steps_before = health(&s).await["steps"].as_u64().unwrap();
    let s = Arc::new(s);
    let tasks: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| {
            let s = s.clone();
            tokio::spawn(async move { post(&s, &b).await })
        })
        .collect();
    // /health answers while the batch runs.
    let mut peak = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        let h = health(&s).await;
        assert_eq!(h["status"], "ok");
        peak = peak.max(h["active"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (t, want) in tasks.into_iter().zip(&alone) {
        let (status, r) = t.await.unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(&r["choices"][0]["message"]["content"], want);
    }
    let h = health(&s).await;
    assert!(peak <= 8, "more than --max-batch sequences ran: {peak}");
    // Batched: far fewer steps than the 16 requests' tokens one at a time
    // (8 + ... + 23 = 248).
    let steps = h["steps"].as_u64().unwrap() - steps_before;
    assert!(steps < 248 / 2, "{steps} steps for 16 concurrent requests");
    assert_eq!(h["completed"], 32);
}

async fn health(s: &Server) -> Value {
    let r = client().get(s.at("/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_is_an_openai_error_and_the_server_goes_on() {
    let dir = std::env::temp_dir().join(format!("mbq-serve-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/s1000_000000.png"),
        dir.join("circle.png"),
    )
    .unwrap();
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    let allow = dir.to_string_lossy().into_owned();
    let s = Server::start(&[
        "--max-body-bytes",
        "1000000",
        "--max-images",
        "2",
        "--allow-local-files",
        &allow,
    ]);
    let raw = |body: &'static str| {
        let s = &s;
        async move {
            let r = client()
                .post(s.at("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let with_url = |url: &str| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTION},
        ]}]})
    };
    let long = "word ".repeat(600);
    let mut cases: Vec<(u16, Option<&str>, Value)> = vec![
        (
            404,
            Some("model_not_found"),
            json!({"model": "gpt-4o", "messages": ask("s1000_000000.png", QUESTION)}),
        ),
        (
            400,
            Some("invalid_image"),
            with_url("data:image/png;base64,aGVsbG8gd29ybGQ="),
        ),
        (
            400,
            Some("unsupported_image_url"),
            with_url("https://example.com/cat.png"),
        ),
        (
            400,
            Some("invalid_image"),
            with_url(&format!("{allow}/broken.png")),
        ),
        (400, None, with_url("/etc/hostname")),
        (
            400,
            Some("context_length_exceeded"),
            json!({"messages": [{"role": "user", "content": long}]}),
        ),
        (
            400,
            None,
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}),
        ),
        (400, None, json!({"messages": "hi"})),
    ];
    let mut three = ask("s1000_000000.png", QUESTION);
    let img = three[0]["content"][0].clone();
    three[0]["content"]
        .as_array_mut()
        .unwrap()
        .insert(0, img.clone());
    three[0]["content"].as_array_mut().unwrap().insert(0, img);
    cases.push((400, Some("too_many_images"), json!({"messages": three})));
    let big = "x".repeat(2_000_000);
    cases.push((
        413,
        Some("request_too_large"),
        json!({"messages": [{"role": "user", "content": big}]}),
    ));
    for (status, code, body) in &cases {
        let (got, r) = post(&s, body).await;
        assert_eq!(got, *status, "{r}");
        let e = &r["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
        assert!(e["type"].is_string(), "{r}");
        if let Some(code) = code {
            assert_eq!(e["code"], *code, "{r}");
        }
    }
    let (got, r) = raw("{\"messages\": [").await;
    assert_eq!(got, 400);
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let r = client().get(s.at("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    // A file under --allow-local-files works, as a path and a file:// URL.
    for url in [
        format!("{allow}/circle.png"),
        format!("file://{allow}/circle.png"),
    ] {
        let (got, r) = post(&s, &with_url(&url)).await;
        assert_eq!(got, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], "purple");
    }
    // Still serving.
    assert_eq!(health(&s).await["status"], "ok");
    let (got, r) = post(&s, &json!({"messages": ask("s1000_000000.png", QUESTION)})).await;
    assert_eq!(
        (got, &r["choices"][0]["message"]["content"]),
        (200, &json!("purple"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits until `/health` counts `n` cancelled requests and none still
/// running; none may have run to its end. (The engine counts a
/// cancellation before it stores the new number of running requests, so
/// one `/health` may show both for a moment.)
async fn wait_cancelled(s: &Server, n: u64) {
    let t0 = Instant::now();
    loop {
        let h = health(s).await;
        if h["cancelled"] == n && h["active"] == 0 {
            assert_eq!(h["completed"], 0, "a request ran to its end: {h}");
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "not cancelled: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_cancels_its_generation() {
    let s = Server::start(&[]);
    let body = json!({"messages": ask("s1000_000009.png", "Describe the image."), "stream": true, "ignore_eos": true});
    let r = client()
        .post(s.at("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut events = r.bytes_stream().eventsource();
    // The role chunk and a first piece of text, then hang up.
    for _ in 0..2 {
        events.next().await.unwrap().unwrap();
    }
    drop(events);
    wait_cancelled(&s, 1).await;
    assert!(s.log().contains("cancelled by its client"), "{}", s.log());

    // Not streamed: the client gives up waiting for the whole answer.
    let mut body = body.clone();
    body["stream"] = json!(false);
    let gave_up = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap()
        .post(s.at("/v1/chat/completions"))
        .json(&body)
        .send()
        .await;
    assert!(gave_up.is_err(), "the whole answer came within 100 ms");
    wait_cancelled(&s, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_running_requests_then_stops() {
    let mut s = Server::start(&[]);
    let body = json!({"messages": ask("s1000_000009.png", "Describe the image."), "stream": true, "ignore_eos": true, "max_tokens": 200});
    let r = client()
        .post(s.at("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut events = r.bytes_stream().eventsource();
    events.next().await.unwrap().unwrap();
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut data = Vec::new();
    while let Some(e) = events.next().await {
        data.push(e.unwrap().data);
    }
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "the stream was cut"
    );
    let usage_free: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(
        usage_free.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status}: {}", s.log());
    assert!(s.log().contains("stopping"), "{}", s.log());
    // Nothing listens any more.
    assert!(client().get(s.at("/health")).send().await.is_err());
}

/// A Qwen2-VL model served: two image requests batched together (M-RoPE:
/// each sequence at its own (t, h, w) positions and rope delta) give
/// transformers' greedy continuations of the golden cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qwen2vl_requests_batched_give_the_transformers_greedy_text() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let model = fixtures.join("models/qwen2vl");
    let s = Server::start(&["--model", model.to_str().unwrap(), "--max-batch", "4"]);
    let proc = mbq::processor::Processor::load(&model, 406).unwrap();
    let mut tasks = Vec::new();
    let mut want = Vec::new();
    for case in ["qwen2vl_big", "qwen2vl_odd2", "qwen2vl_wide"] {
        let dir = fixtures.join("cases").join(case);
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let golden = mbq::weights::WeightFiles::open_file(&dir.join("golden.safetensors")).unwrap();
        let (_, _, bytes) = golden.raw("greedy_ids").unwrap();
        let ids: Vec<u32> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        want.push(proc.decode(&ids).unwrap());
        let png = std::fs::read(fixtures.join(j["image"].as_str().unwrap())).unwrap();
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
        let body = json!({
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": j["prompt"]},
            ]}],
            "max_tokens": ids.len(), "ignore_eos": true, "temperature": 0,
        });
        let url = s.at("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let r = client().post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    for (t, want) in tasks.into_iter().zip(&want) {
        let (status, r) = t.await.unwrap();
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], *want, "{}", s.log());
    }
}
