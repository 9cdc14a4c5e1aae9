//! `pals serve` over real HTTP on 127.0.0.1 (a free port each): answers equal `pals
//! predict`'s under 32 concurrent clients with mixed tasks, requests of one task share a GPU
//! batch, bad requests get JSON errors with the right status, a full queue answers 503, a
//! failed batch answers 500 and serving goes on, and shutdown (in process and SIGTERM to
//! the binary) answers the requests in flight. Every server stops by the end of its test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::gpu;
use common::tiny::{tiny_glue, tiny_model};
use pals::data::glue::{Example, Split, Task, read_split};
use pals::data::tokenizer::Encoded;
use pals::encode::Pooling;
use pals::gpu::Gpu;
use pals::serve::client::{Client, Reply};
use pals::serve::infer::{CheckpointModel, Infer, ModelInfo};
use pals::serve::{ServeOptions, Server};
use pals::train::commands::{self, DataDirs};
use pals::train::trainer::TrainSettings;
use serde_json::{Value, json};

/// A checkpoint trained on the tiny GLUE directory, and `pals predict`'s files for it.
struct Fixture {
    root: PathBuf,
    glue: PathBuf,
    run: PathBuf,
    predictions: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // Cargo's scratch directory for tests: one fixture, replaced by the next run.
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-fixture");
        let _ = std::fs::remove_dir_all(&root);
        let f = Fixture {
            glue: root.join("glue"),
            run: root.join("run"),
            predictions: root.join("predictions"),
            root: root.clone(),
        };
        std::fs::create_dir_all(root.join("model")).unwrap();
        tiny_model(&root.join("model"));
        tiny_glue(&f.glue);
        let settings = TrainSettings {
            tasks: vec!["sst-2".into(), "sts-b".into()],
            batch_size: 8,
            max_length: 16,
            lr: 1e-3,
            epochs: 1,
            steps_per_epoch: 8,
            ..TrainSettings::default()
        };
        let start = commands::Start { save_init: true, ..Default::default() };
        commands::train(gpu(), &root.join("model"), &DataDirs::glue(&f.glue), &f.run, settings, &start)
            .unwrap();
        commands::predict(gpu(), &f.run, &DataDirs::glue(&f.glue), &f.predictions).unwrap();
        f
    })
}

fn options(max_batch: usize, max_wait_ms: u64) -> ServeOptions {
    ServeOptions {
        port: 0,
        max_batch,
        max_wait: Duration::from_millis(max_wait_ms),
        ..ServeOptions::new(fixture().run.clone())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// No request in these tests may take longer than this.
const PATIENCE: Duration = Duration::from_secs(120);

async fn post(client: &Client, url: String, body: Value) -> Reply {
    tokio::time::timeout(PATIENCE, client.post_json(&url, &body)).await.expect("answered in time").unwrap()
}

fn test_examples(task: Task) -> Vec<Example> {
    read_split(&fixture().glue, task, Split::Test).unwrap().examples
}

/// `pals predict`'s answer per test example: (label or score text).
fn predicted(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture().predictions.join(file)).unwrap();
    text.lines().skip(1).map(|l| l.split('\t').nth(1).unwrap().to_string()).collect()
}

fn input(e: &Example) -> Value {
    match &e.text_b {
        Some(b) => json!({ "text": e.text_a, "text_b": b }),
        None => json!({ "text": e.text_a }),
    }
}

/// The answer to one input agrees with `pals predict`'s text for it.
fn check_answer(task: &str, answer: &Value, want: &str) {
    if task == "STS-B" {
        let score = answer["score"].as_f64().unwrap();
        let want: f64 = want.parse().unwrap();
        // predict prints three decimals: within half a unit of the last, plus float noise.
        assert!((score - want).abs() <= 5.1e-4, "STS-B score {score} vs pals predict {want}");
        return;
    }
    assert_eq!(answer["label"], want, "{task}: {answer} vs pals predict {want}");
    let probabilities = answer["probabilities"].as_object().unwrap();
    let total: f64 = probabilities.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-6, "{answer}");
    let best = probabilities.iter().max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap()).unwrap();
    assert_eq!(best.0, want, "the label is the most probable class: {answer}");
}

fn batch_totals(metrics: &str) -> (f64, f64) {
    let value = |name: &str| -> f64 {
        metrics.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().parse().unwrap()).unwrap()
    };
    (value("pals_batch_size_sum "), value("pals_batch_size_count "))
}

#[test]
fn answers_equal_pals_predict_under_32_concurrent_clients() {
    let server = Server::start(&options(8, 10)).unwrap();
    let url = server.url();
    let sst = (test_examples(Task::SST2), predicted("SST-2.tsv"));
    let sts = (test_examples(Task::STSB), predicted("STS-B.tsv"));
    assert_eq!((sst.0.len(), sts.0.len()), (13, 11));
    let rt = runtime();
    rt.block_on(async {
        let client = Client::default();
        let tasks = client.get(&format!("{url}/v1/tasks")).await.unwrap().json().unwrap();
        assert_eq!(tasks["method"], "pals");
        assert_eq!(tasks["tasks"][0]["name"], "SST-2");
        assert_eq!(tasks["tasks"][0]["labels"], json!(["0", "1"]));
        assert_eq!(tasks["tasks"][1]["regression"], true);

        // 32 clients, each 4 requests: single inputs of either task, and whole test sets.
        let mut clients = Vec::new();
        for c in 0..32usize {
            let (client, url, sst, sts) = (client.clone(), url.clone(), sst.clone(), sts.clone());
            clients.push(tokio::spawn(async move {
                for r in 0..4usize {
                    let i = c * 4 + r;
                    let (task, (examples, want)) = if i % 2 == 0 { ("sst-2", &sst) } else { ("STS-B", &sts) };
                    let rows: Vec<usize> = match i % 7 {
                        0 => (0..examples.len()).collect(),
                        _ => vec![i % examples.len()],
                    };
                    let inputs: Vec<Value> = rows.iter().map(|&j| input(&examples[j])).collect();
                    let reply =
                        post(&client, format!("{url}/v1/predict"), json!({"task": task, "inputs": inputs}))
                            .await;
                    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
                    let body = reply.json().unwrap();
                    let name = body["task"].as_str().unwrap().to_string();
                    let answers = body["predictions"].as_array().unwrap();
                    assert_eq!(answers.len(), rows.len());
                    for (answer, &j) in answers.iter().zip(&rows) {
                        check_answer(&name, answer, &want[j]);
                    }
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        let metrics = String::from_utf8(client.get(&format!("{url}/metrics")).await.unwrap().body).unwrap();
        assert!(
            metrics.contains("pals_requests_total{route=\"/v1/predict\",status=\"200\"} 128\n"),
            "{metrics}"
        );
        assert!(metrics.contains("pals_queue_depth 0\n"), "{metrics}");
        let (inputs, batches) = batch_totals(&metrics);
        eprintln!("{inputs} inputs in {batches} GPU batches");
    });
    drop(rt);
    server.stop().unwrap();
}

#[test]
fn requests_of_one_task_share_a_batch_and_tasks_do_not() {
    // A long wait: a batch runs as soon as 2 inputs of its task are there, not at the timeout.
    let server = Server::start(&options(2, 20_000)).unwrap();
    let url = server.url();
    let sst = (test_examples(Task::SST2), predicted("SST-2.tsv"));
    let sts = (test_examples(Task::STSB), predicted("STS-B.tsv"));
    let rt = runtime();
    rt.block_on(async {
        let client = Client::default();
        let started = Instant::now();
        let requests: Vec<_> = (0..4)
            .map(|i| {
                let (task, (examples, want)) = if i % 2 == 0 { ("SST-2", &sst) } else { ("STS-B", &sts) };
                let body = json!({"task": task, "inputs": [input(&examples[i])]});
                let (client, url, want) = (client.clone(), url.clone(), want[i].clone());
                tokio::spawn(
                    async move { (task, want, post(&client, format!("{url}/v1/predict"), body).await) },
                )
            })
            .collect();
        for r in requests {
            let (task, want, reply) = r.await.unwrap();
            assert_eq!(reply.status, 200);
            check_answer(task, &reply.json().unwrap()["predictions"][0], &want);
        }
        assert!(started.elapsed() < Duration::from_secs(15), "full batches did not wait for the timeout");
        let metrics = String::from_utf8(client.get(&format!("{url}/metrics")).await.unwrap().body).unwrap();
        assert_eq!(batch_totals(&metrics), (4.0, 2.0), "two tasks, two GPU batches of two:\n{metrics}");
    });
    drop(rt);
    server.stop().unwrap();
}

#[test]
fn encode_pools_as_pals_encode_does() {
    // The init checkpoint holds the model's own weights: compare with `pals encode`.
    let init = fixture().run.join("init");
    let server = Server::start(&ServeOptions { checkpoint: init, ..options(8, 1) }).unwrap();
    let url = server.url();
    let texts = ["good movie", "the cat sits", "a dog runs the plot is awful"];
    let mut encoder = pals::encode::Encoder::from_dir(gpu(), &fixture().root.join("model")).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::default();
        for (pooling, name) in [(Pooling::Mean, "mean"), (Pooling::Cls, "cls"), (Pooling::Pooler, "pooler")] {
            let want = encoder.encode(&texts.map(String::from), pooling, 8, 16).unwrap();
            let inputs: Vec<Value> = texts.iter().map(|t| json!({"text": t})).collect();
            let reply =
                post(&client, format!("{url}/v1/encode"), json!({"inputs": inputs, "pooling": name})).await;
            assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
            let body = reply.json().unwrap();
            assert_eq!(body["dimensions"], 32);
            for (got, want) in body["embeddings"].as_array().unwrap().iter().zip(&want) {
                let got: Vec<f32> =
                    got.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                common::assert_close(name, &got, want, 1e-4, 1e-5);
            }
        }
        let body = json!({"inputs": [{"text": "good movie"}], "normalize": true});
        let reply = post(&client, format!("{url}/v1/encode"), body).await.json().unwrap();
        let norm: f64 =
            reply["embeddings"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap().powi(2)).sum();
        assert!((norm - 1.0).abs() < 1e-5, "normalized: {norm}");
    });
    drop(rt);
    server.stop().unwrap();
}

#[test]
fn bad_requests_get_json_errors_naming_what_is_wrong() {
    let server = Server::start(&ServeOptions { max_inputs: 4, max_body: 2048, ..options(8, 1) }).unwrap();
    let url = server.url();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::default();
        let predict = format!("{url}/v1/predict");
        let one = json!([{"text": "good movie"}]);
        let too_long = "good ".repeat(500);
        let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            ("malformed JSON", b"{\"task\": \"sst-2\", ".to_vec(), 400, "malformed JSON"),
            ("not an object", b"[1, 2]".to_vec(), 400, "malformed JSON"),
            ("unknown field", br#"{"task": "sst-2", "inputz": []}"#.to_vec(), 400, "inputz"),
            (
                "unknown task",
                json!({"task": "qnli", "inputs": one}).to_string().into(),
                400,
                "unknown task 'qnli': this model serves SST-2, STS-B",
            ),
            ("no task", json!({"inputs": one}).to_string().into(), 400, "missing \"task\""),
            ("no inputs", json!({"task": "sst-2"}).to_string().into(), 400, "missing \"inputs\""),
            (
                "empty inputs",
                json!({"task": "sst-2", "inputs": []}).to_string().into(),
                400,
                "\"inputs\" is empty",
            ),
            (
                "missing text",
                json!({"task": "sst-2", "inputs": [{"text": "a"}, {"text_b": "b"}]}).to_string().into(),
                400,
                "inputs[1]: missing \"text\"",
            ),
            (
                "text not a string",
                json!({"task": "sst-2", "inputs": [{"text": 5}]}).to_string().into(),
                400,
                "invalid type",
            ),
            (
                "too many inputs",
                json!({"task": "sst-2", "inputs": [one[0], one[0], one[0], one[0], one[0]]})
                    .to_string()
                    .into(),
                413,
                "5 inputs, at most 4 per request (--max-inputs)",
            ),
            (
                "body too large",
                json!({"task": "sst-2", "inputs": [{"text": too_long}]}).to_string().into(),
                413,
                "over 2048 bytes (--max-body)",
            ),
            (
                "not UTF-8",
                b"{\"task\": \"sst-2\", \"inputs\": [{\"text\": \"\xff\xfe\"}]}".to_vec(),
                400,
                "not UTF-8 (invalid byte at offset 39)",
            ),
        ];
        for (what, body, status, message) in cases {
            let reply = client.post(&predict, body).await.unwrap();
            let error = reply.json().unwrap()["error"].as_str().unwrap_or_default().to_string();
            assert_eq!(reply.status, status, "{what}: {error}");
            assert!(error.contains(message), "{what}: '{error}' should say '{message}'");
        }
        let encode = format!("{url}/v1/encode");
        let reply = post(&client, encode.clone(), json!({"inputs": one, "pooling": "max"})).await;
        assert_eq!(
            (reply.status, reply.json().unwrap()["error"].as_str().unwrap()),
            (400, "\"pooling\": 'max': use mean, cls or pooler")
        );
        let reply = post(&client, encode, json!({"inputs": [{"text": "a", "text_b": "b"}]})).await;
        assert!(reply.status == 400 && reply.json().unwrap()["error"].as_str().unwrap().contains("text_b"));
        let reply = client.get(&format!("{url}/v2/predict")).await.unwrap();
        assert_eq!(reply.status, 404);
        assert!(reply.json().unwrap()["error"].as_str().unwrap().contains("no route /v2/predict"));
        let reply = client.get(&predict).await.unwrap();
        assert_eq!(reply.status, 405);
        assert!(reply.json().unwrap()["error"].as_str().unwrap().contains("GET /v1/predict"));
        // After all that, the server still answers.
        let reply = post(&client, predict, json!({"task": "sst2", "inputs": one})).await;
        assert_eq!(reply.status, 200);
        let health = client.get(&format!("{url}/health")).await.unwrap().json().unwrap();
        assert_eq!(health["status"], "ok");
    });
    drop(rt);
    server.stop().unwrap();
}

/// The checkpoint's model behind a gate: each batch waits to be let through, and says
/// when it has started.
struct Gated<'g> {
    inner: CheckpointModel<'g>,
    started: Sender<()>,
    go: Receiver<()>,
}

impl Infer for Gated<'_> {
    fn info(&self) -> ModelInfo {
        self.inner.info()
    }
    fn predict(&mut self, task: usize, inputs: &[Encoded]) -> Result<Vec<Vec<f32>>> {
        self.started.send(())?;
        self.go.recv_timeout(PATIENCE)?;
        self.inner.predict(task, inputs)
    }
    fn encode(&mut self, encoder: usize, inputs: &[Encoded], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        self.inner.encode(encoder, inputs, pooling)
    }
}

fn load<'g>(gpu: &'g Gpu, options: &ServeOptions) -> CheckpointModel<'g> {
    CheckpointModel::load(gpu, &options.checkpoint, options.max_batch).unwrap()
}

#[test]
fn a_full_queue_answers_503_and_then_recovers() {
    let options = ServeOptions { queue: 1, ..options(1, 0) };
    let (started_tx, started) = channel();
    let (go, go_rx) = channel();
    let model_options = options.clone();
    let server = Server::start_with(
        &options,
        Box::new(move |gpu| {
            Ok(Box::new(Gated { inner: load(gpu, &model_options), started: started_tx, go: go_rx })
                as Box<dyn Infer>)
        }),
    )
    .unwrap();
    let url = server.url();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::default();
        let body = json!({"task": "sst-2", "inputs": [{"text": "good movie"}]});
        let send = || {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move { post(&client, format!("{url}/v1/predict"), body).await })
        };
        // The first request holds the GPU thread, the second fills the queue of one.
        let first = send();
        started.recv_timeout(PATIENCE).unwrap();
        let second = send();
        let deadline = Instant::now() + PATIENCE;
        while client.get(&format!("{url}/health")).await.unwrap().json().unwrap()["queue_depth"] != 1 {
            assert!(Instant::now() < deadline, "the second request never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let third = send().await.unwrap();
        assert_eq!(third.status, 503);
        assert!(third.json().unwrap()["error"].as_str().unwrap().contains("queue is full"));
        go.send(()).unwrap();
        go.send(()).unwrap();
        assert_eq!(first.await.unwrap().status, 200);
        assert_eq!(second.await.unwrap().status, 200);
        let fourth = send();
        go.send(()).unwrap();
        assert_eq!(fourth.await.unwrap().status, 200, "serving again once the queue drained");
    });
    drop(rt);
    server.stop().unwrap();
}

/// The checkpoint's model, failing on cue: a batch with an unknown word fails with an
/// error in the first text, with a panic in the second.
struct Faulty<'g> {
    inner: CheckpointModel<'g>,
    unknown: u32,
}

impl Infer for Faulty<'_> {
    fn info(&self) -> ModelInfo {
        self.inner.info()
    }
    fn predict(&mut self, task: usize, inputs: &[Encoded]) -> Result<Vec<Vec<f32>>> {
        for e in inputs {
            let unknown =
                |part: u32| e.ids.iter().zip(&e.type_ids).any(|(&i, &t)| i == self.unknown && t == part);
            if unknown(0) {
                bail!("device lost (injected)");
            }
            assert!(!unknown(1), "injected panic");
        }
        self.inner.predict(task, inputs)
    }
    fn encode(&mut self, encoder: usize, inputs: &[Encoded], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        self.inner.encode(encoder, inputs, pooling)
    }
}

#[test]
fn a_failed_batch_answers_500_and_serving_goes_on() {
    let options = options(8, 1);
    let model_options = options.clone();
    let server = Server::start_with(
        &options,
        Box::new(move |gpu| {
            Ok(Box::new(Faulty { inner: load(gpu, &model_options), unknown: 1 }) as Box<dyn Infer>)
        }),
    )
    .unwrap();
    let url = server.url();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::default();
        let predict = format!("{url}/v1/predict");
        let ok = json!({"task": "sts-b", "inputs": [{"text": "good movie", "text_b": "bad movie"}]});
        for (body, message) in [
            (
                json!({"task": "sts-b", "inputs": [{"text": "zzz", "text_b": "bad"}]}),
                "device lost (injected)",
            ),
            (json!({"task": "sts-b", "inputs": [{"text": "good", "text_b": "zzz"}]}), "panicked"),
        ] {
            let reply = post(&client, predict.clone(), body).await;
            assert_eq!(reply.status, 500);
            let error = reply.json().unwrap()["error"].as_str().unwrap().to_string();
            assert!(error.contains(message), "{error}");
            assert_eq!(post(&client, predict.clone(), ok.clone()).await.status, 200, "still serving");
        }
        let metrics = String::from_utf8(client.get(&format!("{url}/metrics")).await.unwrap().body).unwrap();
        assert!(metrics.contains("pals_failed_batches_total 2\n"), "{metrics}");
        assert!(
            metrics.contains("pals_requests_total{route=\"/v1/predict\",status=\"500\"} 2\n"),
            "{metrics}"
        );
    });
    drop(rt);
    server.stop().unwrap();
}

#[test]
fn stop_answers_the_requests_in_flight_then_refuses_connections() {
    // The request waits 1.5 s for company, so it is in flight when the stop begins.
    let server = Server::start(&options(8, 1500)).unwrap();
    let url = server.url();
    let rt = runtime();
    let client = Client::default();
    let body = json!({"task": "sst-2", "inputs": [{"text": "good movie"}]});
    let in_flight = rt.spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, format!("{url}/v1/predict"), body).await }
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopping = std::thread::spawn(move || server.stop());
    let reply = rt.block_on(in_flight).unwrap();
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    stopping.join().unwrap().unwrap();
    let after = rt.block_on(Client::default().get(&format!("{url}/health")));
    assert!(after.is_err(), "connections are refused after the stop: {after:?}");
}

/// Reads the binary's standard error until it says where it listens.
fn listening_url(stderr: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    for _ in 0..50 {
        line.clear();
        if stderr.read_line(&mut line)? == 0 {
            bail!("pals serve exited before listening");
        }
        if let Some(url) = line.trim().strip_prefix("listening on ") {
            return Ok(url.to_string());
        }
    }
    bail!("pals serve never said where it listens")
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pals"))
        .args(["serve", "--port", "0", "--max-wait-ms", "1500", "--checkpoint"])
        .arg(&fixture().run)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let url = listening_url(&mut stderr).unwrap();
    let rt = runtime();
    let client = Client::default();
    assert_eq!(rt.block_on(client.get(&format!("{url}/health"))).unwrap().status, 200);
    let body = json!({"task": "sts-b", "inputs": [{"text": "good movie", "text_b": "a movie"}]});
    let in_flight = rt.spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, format!("{url}/v1/predict"), body).await }
    });
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert_eq!(rt.block_on(in_flight).unwrap().status, 200, "the request in flight is answered");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "pals serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = stderr.lines().map(|l| l.unwrap()).collect();
    assert!(status.success(), "exit {status}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopping")), "{rest:?}");
}

#[test]
fn a_missing_checkpoint_is_a_clear_error() {
    let missing = Path::new("/nonexistent/pals-run");
    let error = Server::start(&ServeOptions::new(missing.to_path_buf())).err().unwrap();
    assert!(format!("{error:#}").contains("/nonexistent/pals-run"), "{error:#}");
    let error = Server::start(&ServeOptions { max_batch: 0, ..options(1, 0) }).err().unwrap();
    assert!(error.to_string().contains("--max-batch"), "{error}");
}

#[test]
fn bench_reports_both_modes_at_each_concurrency() {
    let bench = pals::bench::serve::ServeBench {
        checkpoint: fixture().run.clone(),
        adapter: pals::gpu::AdapterChoice::from_env(),
        concurrency: vec![1, 4],
        requests: 8,
    };
    let lines = pals::bench::serve::serve_bench(&bench).unwrap();
    // A row per concurrency and mode: "clients  mode  req/s p50 p99 batch  ratio×".
    let rows: Vec<&String> = lines.iter().filter(|l| l.ends_with('×')).collect();
    assert_eq!(rows.len(), 4, "{lines:#?}");
    for (row, (clients, mode)) in
        rows.iter().zip([(1, "no batching"), (1, "batching"), (4, "no batching"), (4, "batching")])
    {
        assert!(row.trim_start().starts_with(&format!("{clients}  {mode} ")), "{row}");
    }
    let error = pals::bench::serve::serve_bench(&pals::bench::serve::ServeBench { requests: 0, ..bench })
        .err()
        .unwrap();
    assert!(error.to_string().contains("--requests"), "{error}");
}
