//! `pals bench --serve CHECKPOINT`: a server on 127.0.0.1 driven by closed-loop HTTP
//! clients (each sends its next request when the last is answered), at each concurrency,
//! without batching (--max-batch 1, the yardstick) and with it (--max-batch 32,
//! --max-wait-ms 5): requests/s, p50/p99 latency, inputs per GPU batch, and requests/s
//! as a ratio to the unbatched server at the same concurrency.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;

use crate::gpu::AdapterChoice;
use crate::serve::client::Client;
use crate::serve::infer::ModelInfo;
use crate::serve::{ServeOptions, Server};

pub struct ServeBench {
    pub checkpoint: PathBuf,
    pub adapter: AdapterChoice,
    /// Concurrent clients per level.
    pub concurrency: Vec<usize>,
    /// Requests per level and mode.
    pub requests: usize,
}

/// One level's figures.
struct Level {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    inputs_per_batch: f64,
}

const SENTENCES: &[&str] = &[
    "A man is playing a guitar on the street.",
    "The movie was a complete waste of time.",
    "Two dogs run across the snowy field.",
    "She did not expect the results to be this good.",
    "The committee approved the new budget on Tuesday.",
    "I would never recommend this restaurant to anyone.",
    "A child is reading a book under a tree.",
    "The stock market fell sharply after the announcement.",
];

/// One input for request `i` of `task`: a pair for every task but the single-sentence ones.
fn body(info: &ModelInfo, i: usize) -> serde_json::Value {
    let task = &info.tasks[i % info.tasks.len()].name;
    let text = SENTENCES[i % SENTENCES.len()];
    let input = match task.as_str() {
        "CoLA" | "SST-2" => json!({ "text": text }),
        _ => json!({ "text": text, "text_b": SENTENCES[(i / 3 + 1) % SENTENCES.len()] }),
    };
    json!({ "task": task, "inputs": [input] })
}

pub fn serve_bench(bench: &ServeBench) -> Result<Vec<String>> {
    if bench.concurrency.contains(&0) || bench.requests == 0 {
        bail!("--concurrency and --requests must be at least 1");
    }
    let client_runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut lines = Vec::new();
    let mut yardstick: Vec<f64> = Vec::new();
    let mut rows = Vec::new();
    for (mode, max_batch, wait_ms) in [("no batching", 1, 0), ("batching", 32, 5)] {
        let options = ServeOptions {
            port: 0,
            adapter: bench.adapter.clone(),
            max_batch,
            max_wait: Duration::from_millis(wait_ms),
            queue: 4096,
            ..ServeOptions::new(bench.checkpoint.clone())
        };
        let server = Server::start(&options)?;
        if lines.is_empty() {
            let tasks: Vec<&str> = server.info.tasks.iter().map(|t| t.name.as_str()).collect();
            lines.push(format!("adapter: {}", server.info.adapter));
            lines.push(format!(
                "checkpoint: {} ({}: {})",
                server.info.checkpoint,
                server.info.method,
                tasks.join(", ")
            ));
            lines.push(format!("{} requests per level, one input each, tasks in turn", bench.requests));
        }
        let url = server.url();
        for (level, &clients) in bench.concurrency.iter().enumerate() {
            // Warm: buffers and pipelines for this level's shapes exist before timing.
            client_runtime.block_on(drive(&url, &server.info, clients, clients * 2))?;
            let figures = client_runtime.block_on(drive(&url, &server.info, clients, bench.requests))?;
            let ratio = match yardstick.get(level) {
                Some(base) => format!("{:.2}×", figures.requests_per_s / base),
                None => {
                    yardstick.push(figures.requests_per_s);
                    "1.00×".into()
                }
            };
            let row = format!(
                "{clients:>11}  {mode:<12} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {ratio}",
                figures.requests_per_s, figures.p50_ms, figures.p99_ms, figures.inputs_per_batch
            );
            // Levels can take minutes on a CPU adapter: show each as it is measured.
            eprintln!("{row}");
            rows.push(row);
        }
        server.stop()?;
    }
    rows.sort_by_key(|row| row[..11].trim().parse::<usize>().unwrap_or(0));
    lines.push(format!(
        "{:>11}  {:<12} {:>9} {:>9} {:>9} {:>9}  {}",
        "concurrency", "mode", "req/s", "p50 ms", "p99 ms", "batch", "req/s vs no batching"
    ));
    lines.extend(rows);
    Ok(lines)
}

/// `requests` requests from `clients` closed-loop clients; every answer must be a 200.
async fn drive(url: &str, info: &ModelInfo, clients: usize, requests: usize) -> Result<Level> {
    let client = Client::default();
    let before = batch_totals(&client, url).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (client, next, info) = (client.clone(), next.clone(), info.clone());
        let predict = format!("{url}/v1/predict");
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= requests {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let sent = Instant::now();
                let reply = client.post_json(&predict, &body(&info, i)).await?;
                if reply.status != 200 {
                    bail!("request {i}: status {}: {}", reply.status, String::from_utf8_lossy(&reply.body));
                }
                latencies.push(sent.elapsed().as_secs_f64());
            }
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = batch_totals(&client, url).await?;
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize] * 1e3;
    Ok(Level {
        requests_per_s: requests as f64 / seconds,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        inputs_per_batch: (after.0 - before.0) / (after.1 - before.1).max(1.0),
    })
}

/// (inputs, batches) run so far, from the server's /metrics.
async fn batch_totals(client: &Client, url: &str) -> Result<(f64, f64)> {
    let text = String::from_utf8(client.get(&format!("{url}/metrics")).await?.body)?;
    let value = |name: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    };
    Ok((value("pals_batch_size_sum "), value("pals_batch_size_count ")))
}
