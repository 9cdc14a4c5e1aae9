//! `pals serve`: one checkpoint on the GPU answers every one of its tasks over HTTP.
//!
//!   HTTP handlers (tokio) → bounded queue → GPU thread: batches per task → answers
//!
//! - `routes`: the API, request checks and JSON errors;
//! - `batcher`: the thread that owns the GPU and the model, and its dynamic batching;
//! - `infer`: the model behind a small interface (a checkpoint, as `pals predict` runs it);
//! - `metrics`: Prometheus counters; `client`: a small HTTP/1 client for the bench and tests.

pub mod batcher;
pub mod client;
pub mod infer;
pub mod metrics;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

use crate::data::Tokenizer;
use crate::gpu::AdapterChoice;
use batcher::{Limits, Loader};
use infer::{CheckpointModel, Infer, ModelInfo};
use metrics::Metrics;
use routes::AppState;

/// Everything `pals serve` is told.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// A checkpoint, or a `pals train` output directory (its `best/` is served).
    pub checkpoint: PathBuf,
    pub adapter: AdapterChoice,
    pub host: String,
    /// 0: any free port (see [`Server::addr`]).
    pub port: u16,
    /// Inputs per GPU batch; 1 turns batching off.
    pub max_batch: usize,
    /// How long a request waits for others of its task to share its batch.
    pub max_wait: Duration,
    /// Requests waiting for the GPU at most; more are answered 503.
    pub queue: usize,
    /// Inputs per request at most (413 beyond).
    pub max_inputs: usize,
    /// Request body bytes at most (413 beyond).
    pub max_body: usize,
}

impl ServeOptions {
    pub fn new(checkpoint: PathBuf) -> ServeOptions {
        ServeOptions {
            checkpoint,
            adapter: AdapterChoice::from_env(),
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            queue: 256,
            max_inputs: 64,
            max_body: 1 << 20,
        }
    }

    fn check(&self) -> Result<()> {
        for (flag, value) in [
            ("--max-batch", self.max_batch),
            ("--queue", self.queue),
            ("--max-inputs", self.max_inputs),
            ("--max-body", self.max_body),
        ] {
            if value == 0 {
                anyhow::bail!("{flag} must be at least 1");
            }
        }
        Ok(())
    }
}

/// The flags of `pals serve` (the adapter's are the CLI's own).
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// A checkpoint, or a `pals train` output directory (its best/ is served).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Inputs per GPU batch; 1 turns batching off.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Milliseconds a request waits for others of its task to share its GPU batch.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Requests waiting for the GPU at most; more are answered 503.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Inputs per request at most (413 beyond).
    #[arg(long, default_value_t = 64)]
    pub max_inputs: usize,
    /// Request body bytes at most (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
}

impl ServeArgs {
    pub fn options(&self, adapter: AdapterChoice) -> ServeOptions {
        ServeOptions {
            checkpoint: self.checkpoint.clone(),
            adapter,
            host: self.host.clone(),
            port: self.port,
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue: self.queue,
            max_inputs: self.max_inputs,
            max_body: self.max_body,
        }
    }
}

/// A running server: HTTP on its own tokio runtime, the model on its GPU thread.
pub struct Server {
    pub addr: SocketAddr,
    pub info: ModelInfo,
    runtime: Runtime,
    shutdown: Option<oneshot::Sender<()>>,
    http: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    gpu: Option<JoinHandle<()>>,
}

impl Server {
    /// Loads the checkpoint onto the adapter and starts answering on host:port.
    pub fn start(options: &ServeOptions) -> Result<Server> {
        let (dir, max_batch) = (options.checkpoint.clone(), options.max_batch);
        Server::start_with(
            options,
            Box::new(move |gpu| Ok(Box::new(CheckpointModel::load(gpu, &dir, max_batch)?) as Box<dyn Infer>)),
        )
    }

    /// As [`Server::start`] with the model `load` makes on the GPU thread (from the adapter
    /// of `options`); the tokenizer is still the checkpoint's.
    pub fn start_with(options: &ServeOptions, load: Loader) -> Result<Server> {
        options.check()?;
        let metrics = Arc::new(Metrics::default());
        let limits =
            Limits { max_batch: options.max_batch, max_wait: options.max_wait, queue: options.queue };
        let (queue, info, gpu) = batcher::spawn(options.adapter.clone(), load, limits, metrics.clone())?;
        // On an error from here on, dropping `queue` ends the GPU thread.
        let dir = crate::train::rundir::checkpoint_to_read(&options.checkpoint)?;
        let tokenizer = Tokenizer::from_dir(&dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("pals-http")
            .build()
            .context("starting the HTTP runtime")?;
        let address = format!("{}:{}", options.host, options.port);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&address))
            .with_context(|| format!("--host/--port: cannot listen on {address}"))?;
        let addr = listener.local_addr()?;
        let state = AppState {
            queue,
            tokenizer,
            info: info.clone(),
            metrics,
            max_inputs: options.max_inputs,
            max_body: options.max_body,
        };
        let app = routes::router(Arc::new(state));
        let (shutdown, stopped) = oneshot::channel::<()>();
        let http = runtime.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Server { addr, info, runtime, shutdown: Some(shutdown), http: Some(http), gpu: Some(gpu) })
    }

    /// The base URL, e.g. `http://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Blocks until Ctrl-C or SIGTERM, then stops as [`Server::stop`] does.
    pub fn run_until_signal(mut self) -> Result<()> {
        self.runtime.block_on(signal())?;
        eprintln!("stopping: finishing the requests in flight");
        self.shutdown_now()
    }

    /// Stops accepting connections, answers the requests in flight, then ends the GPU
    /// thread. Call it outside any async context.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown_now()
    }

    fn shutdown_now(&mut self) -> Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(http) = self.http.take() {
            // The router, and with it every queue sender, is dropped when serving ends.
            self.runtime.block_on(http).context("the HTTP task")?.context("serving HTTP")?;
        }
        if let Some(gpu) = self.gpu.take() {
            gpu.join().map_err(|_| anyhow!("the GPU thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown_now() {
            eprintln!("stopping the server: {error:#}");
        }
    }
}

/// Ctrl-C, or SIGTERM where there is one.
async fn signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("listening for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("listening for Ctrl-C")?;
    Ok(())
}

/// `pals serve`: starts, says where, and serves until Ctrl-C or SIGTERM.
pub fn serve(options: &ServeOptions) -> Result<()> {
    let server = Server::start(options)?;
    let tasks: Vec<&str> = server.info.tasks.iter().map(|t| t.name.as_str()).collect();
    eprintln!(
        "serving {} ({}: {}) on {}",
        server.info.checkpoint,
        server.info.method,
        tasks.join(", "),
        server.info.adapter
    );
    eprintln!("listening on {}", server.url());
    server.run_until_signal()
}
