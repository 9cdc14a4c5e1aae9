//! The `pals` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use pals::data::custom::CustomArg;
use pals::encode::{Encoder, Pooling};
use pals::gpu::{AdapterChoice, Gpu};
use pals::model::tasks::MethodName;
use pals::train::checks::{at_least, checked, task_flags};
use pals::train::commands;
use pals::train::trainer::{Precision, TrainSettings};

#[derive(Parser)]
#[command(name = "pals", version, about = "BERT and PALs: multi-task BERT on any GPU through wgpu")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct AdapterArgs {
    /// Adapter index (from `pals devices`) or part of its name; default: the best one.
    #[arg(long, env = "PALS_ADAPTER", global = true)]
    adapter: Option<String>,
    /// Restrict to one backend: vulkan, metal, dx12 or gl.
    #[arg(long, env = "PALS_BACKEND", global = true)]
    backend: Option<String>,
}

impl AdapterArgs {
    fn choice(&self) -> AdapterChoice {
        // Under mpirun each rank takes its local rank's adapter unless told otherwise.
        let adapter = self.adapter.clone().or_else(|| pals::dist::default_adapter(self.backend.as_deref()));
        AdapterChoice { adapter, backend: self.backend.clone() }
    }

    fn open(&self) -> Result<Gpu> {
        Ok(Gpu::new(&self.choice())?)
    }
}

/// Where `eval` and `predict` read a checkpoint's data.
#[derive(Args, Clone)]
struct DataArgs {
    /// GLUE directory, one folder per task (needed for the checkpoint's GLUE tasks).
    #[arg(long, env = "PALS_GLUE_DIR")]
    glue_dir: Option<PathBuf>,
    /// A custom task's data moved: read task NAME from DIR instead of the folder it was
    /// trained from (which the checkpoint recorded). Repeatable.
    #[arg(long = "task", value_name = "NAME=DIR")]
    custom: Vec<CustomArg>,
}

impl DataArgs {
    fn dirs(&self) -> commands::DataDirs {
        commands::DataDirs { glue: self.glue_dir.clone(), custom: self.custom.clone() }
    }
}

/// The training recipe; the defaults are the paper's.
#[derive(Args, Clone)]
struct RunArgs {
    /// Comma-separated GLUE tasks, e.g. rte,mrpc,sts-b,cola,sst-2.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Your own task, repeatable: NAME=DIR[:classification|:regression], DIR holding train,
    /// dev and optionally test as .csv, .tsv or .jsonl with columns text (or sentence1,
    /// sentence2) and label. Trained after the --tasks ones.
    #[arg(long = "task", value_name = "NAME=DIR[:KIND]")]
    custom: Vec<CustomArg>,
    /// The task-specific method.
    #[arg(long, value_enum, default_value_t = MethodName::Pals)]
    method: MethodName,
    /// PAL hidden size (default 204 for hidden 768, scaled for other widths).
    #[arg(long)]
    pal_dim: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    #[arg(long, default_value_t = 2e-5)]
    lr: f32,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// An epoch is a fixed number of steps, as in the paper (2400 there).
    #[arg(long, default_value_t = 2400)]
    steps_per_epoch: usize,
    /// Fraction of steps of linear warmup.
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    /// proportional, sqrt, annealed or round-robin.
    #[arg(long, default_value = "annealed")]
    sampling: String,
    #[arg(long, default_value_t = 42)]
    seed: u32,
    /// Dropout for every site (default: the model's config); 0 makes runs comparable
    /// with another framework.
    #[arg(long)]
    dropout: Option<f64>,
    /// adamw (bias-corrected) or bert-adam (the paper's: no bias correction).
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// global, per-tensor (the paper's) or none.
    #[arg(long, default_value = "global")]
    clip: String,
    #[arg(long, default_value_t = 1.0)]
    max_norm: f32,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Score at most this many dev examples per task during training.
    #[arg(long)]
    max_eval_examples: Option<usize>,
    /// Stop after this many steps (the schedule still spans all epochs).
    #[arg(long)]
    stop_after: Option<u64>,
    #[command(flatten)]
    precision: PrecisionArgs,
}

#[derive(Args, Clone)]
struct PrecisionArgs {
    /// f32, or mixed: f32 master weights and Adam state, dynamic loss scaling as PyTorch's
    /// GradScaler, the encoder's big products reading f16 copies of their weights, q, k, v
    /// and the FFN's intermediates stored in f16; mixed needs an adapter with shader-f16.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// The same as --precision mixed (Hugging Face's name).
    #[arg(long, conflicts_with = "precision")]
    fp16: bool,
}

impl PrecisionArgs {
    fn precision(&self) -> Precision {
        if self.fp16 { Precision::Mixed } else { self.precision }
    }
}

impl RunArgs {
    /// The settings; custom tasks are read from their folders by `commands::train`.
    fn settings(&self) -> TrainSettings {
        TrainSettings {
            tasks: self.tasks.clone(),
            custom: Vec::new(),
            method: self.method,
            pal_dim: self.pal_dim,
            batch_size: self.batch_size,
            max_length: self.max_length,
            lr: self.lr,
            epochs: self.epochs,
            steps_per_epoch: self.steps_per_epoch,
            warmup: self.warmup,
            sampling: self.sampling.clone(),
            seed: self.seed,
            dropout: self.dropout,
            optimizer: self.optimizer.clone(),
            clip: self.clip.clone(),
            max_norm: self.max_norm,
            weight_decay: self.weight_decay,
            max_eval_examples: self.max_eval_examples,
            stop_after: self.stop_after,
            precision: self.precision.precision(),
        }
    }
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// List every adapter wgpu finds: backend, type, driver, optional features, limits.
    Devices {
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Benchmark the kernels at BERT-base training shapes against a CPU BLAS (or, with
    /// --train, whole training steps).
    Bench {
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Products per timed submit.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Instead: GFLOP/s of every matmul kernel (each tile candidate, the subgroup kernel,
        /// cooperative matrices) on an M×N×K product (e.g. 1024x768x768), as a Linear's
        /// forward x·Wᵀ, or in the form a suffix names: `:nn`, `:nt`, `:tn` (A stored
        /// transposed, as a weight gradient), `:tt`.
        #[arg(long, value_name = "MxNxK[:FORM]")]
        tiles: Option<String>,
        /// Instead: the exact training memory (parameters, gradients, Adam state,
        /// activations) of a model size (base, minilm) or model directory; no GPU needed.
        #[arg(long, value_name = "SIZE|DIR")]
        memory: Option<String>,
        /// Instead: warm training steps of a model size (base, minilm) or model directory
        /// (its config.json; random weights) on one synthetic task: step time, throughput,
        /// dispatches, submits and buffers per step, GPU time per kernel family, memory.
        #[arg(long, value_name = "SIZE|DIR")]
        train: Option<String>,
        /// Instead (under mpirun): the gradient all-reduce at MiniLM's and BERT-base's
        /// gradient sizes, beside MPI's own all-reduce.
        #[arg(long)]
        allreduce: bool,
        /// The method for --train.
        #[arg(long, value_enum, default_value_t = MethodName::Pals)]
        method: MethodName,
        /// Timed steps for --train (after 2 warm-up steps).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[command(flatten)]
        precision: PrecisionArgs,
        /// Sequences per batch for --memory and --train.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Sequence length for --memory and --train.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Instead: `pals serve` on this checkpoint, driven over HTTP on 127.0.0.1 at each
        /// --concurrency, with and without batching: requests/s, p50/p99 latency.
        #[arg(long, value_name = "CHECKPOINT")]
        serve: Option<PathBuf>,
        /// Concurrent clients for --serve.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        concurrency: Vec<usize>,
        /// Requests per concurrency level and mode for --serve.
        #[arg(long, default_value_t = 256)]
        requests: usize,
    },
    /// Train BERT-PALs (or another method) on GLUE tasks and your own, multi-task.
    Train {
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Model directory (Hugging Face: config.json, model.safetensors, tokenizer).
        #[arg(long)]
        model: PathBuf,
        /// GLUE directory, one folder per task (needed for --tasks).
        #[arg(long, env = "PALS_GLUE_DIR")]
        glue_dir: Option<PathBuf>,
        /// Output directory: checkpoints (last/, best/), metrics.jsonl, training.svg.
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        run: RunArgs,
        /// Continue from OUTPUT/last (bit-identical to an uninterrupted run); flags that
        /// differ from the saved run are refused, except --stop-after and --max-eval-examples.
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Replace the run OUTPUT already holds (without it, such a run is never overwritten).
        #[arg(long)]
        overwrite: bool,
        /// Save OUTPUT/init before the first step.
        #[arg(long)]
        save_init: bool,
    },
    /// Print the dev metrics of a checkpoint (an output directory uses its best/).
    Eval {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[arg(long)]
        checkpoint: PathBuf,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Write GLUE submission files (CoLA.tsv, ..., MNLI-m.tsv, AX.tsv) and NAME.tsv for each
    /// custom task (its own label strings) for a checkpoint.
    Predict {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[arg(long)]
        checkpoint: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        output: PathBuf,
    },
    /// Shared, per-task and total parameters of a method, and the ratio to one model.
    Params {
        /// Model directory or a named size (base, minilm).
        #[arg(long, default_value = "base")]
        model: String,
        #[arg(long, value_enum, default_value_t = MethodName::Pals)]
        method: MethodName,
        #[arg(long)]
        pal_dim: Option<usize>,
        #[arg(long, value_delimiter = ',', default_value = "cola,sst-2,mrpc,sts-b,qqp,mnli,qnli,rte")]
        tasks: Vec<String>,
    },
    /// A tiny random BERT-PALs learns built-in synthetic tasks: no download, about two minutes on 2 CPU cores.
    Demo {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[arg(long, default_value = "pals-demo")]
        output: PathBuf,
        #[arg(long, default_value_t = 120)]
        steps_per_epoch: usize,
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        #[arg(long, default_value_t = 42)]
        seed: u32,
    },
    /// Serve a checkpoint's tasks over HTTP (POST /v1/predict, /v1/encode; GET /v1/tasks,
    /// /health, /metrics) from one model on the GPU, batching requests of the same task.
    Serve {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        serve: pals::serve::ServeArgs,
    },
    /// Embed each line of standard input (or --input) with a BERT checkpoint.
    Encode {
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Model directory: config.json, model.safetensors, tokenizer.json or vocab.txt.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum, default_value_t = Pooling::Mean)]
        pooling: Pooling,
        /// Scale each embedding to unit length (as sentence-transformers models do).
        #[arg(long)]
        normalize: bool,
        /// Read sentences from this file instead of standard input.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Write here (.npy → NumPy, else JSON lines) instead of JSON lines on standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Tokens per text, longer texts truncated [default: 128, or the model's limit if lower].
        #[arg(long)]
        max_length: Option<usize>,
    },
}

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`pals bench --memory base | head`)
    // panicked. Unix tools end quietly there instead: restore the default action.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let parsed = Cli::command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m).map(|cli| (m, cli)));
    let (matches, cli) = parsed.unwrap_or_else(|error| refuse_flags(error));
    // Under mpirun: MPI starts before anything can fail, so that a failing rank stops all
    // of them (with a message naming it) instead of leaving them waiting.
    let started = pals::dist::init();
    if let Err(error) =
        started.and_then(|_| check_numbers(&cli.command)).and_then(|_| run(cli, given_flags(&matches)))
    {
        pals::dist::fail(&error);
    }
    pals::dist::finalize();
}

/// Exits on a command line clap refuses (or on --help). Under mpirun the error names the
/// rank (each rank parses its own command line) and stops every rank.
fn refuse_flags(error: clap::Error) -> ! {
    if error.use_stderr() && pals::dist::launched_ranks().unwrap_or(1) > 1 {
        let message = error.render().to_string();
        let message = message.trim_end().trim_start_matches("error: ").to_string();
        let started = pals::dist::init();
        let error = started.err().unwrap_or_else(|| anyhow::anyhow!(message));
        pals::dist::fail(&error);
    }
    error.exit()
}

/// The flags of the subcommand set on the command line or through the environment, as
/// clap ids (which are the settings' field names).
fn given_flags(matches: &ArgMatches) -> Vec<String> {
    let Some((_, sub)) = matches.subcommand() else { return Vec::new() };
    sub.ids()
        .filter(|id| {
            matches!(
                sub.value_source(id.as_str()),
                Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
            )
        })
        // --fp16 sets the precision setting.
        .map(|id| if id == "fp16" { "precision".to_string() } else { id.to_string() })
        .collect()
}

/// Range checks of every number a command takes, before any model or GPU is touched
/// (train's are its settings' checks).
fn check_numbers(command: &Command) -> Result<()> {
    match command {
        Command::Train { run, glue_dir, .. } => {
            task_flags(&run.tasks, &run.custom)?;
            if glue_dir.is_none() && !run.tasks.is_empty() {
                anyhow::bail!(
                    "config error: --tasks {} needs --glue-dir (or PALS_GLUE_DIR)",
                    run.tasks.join(",")
                );
            }
            checked(run.settings()).map(|_| ())
        }
        Command::Bench { reps, steps, batch, seq, train, memory, precision, tiles, .. } => {
            if precision.precision() == Precision::Mixed && train.is_none() && memory.is_none() {
                anyhow::bail!("config error: --precision mixed (--fp16) is for --train and --memory only");
            }
            if let Some(shape) = tiles {
                parse_tiles_shape(shape)?;
            }
            at_least("--reps", *reps as u64, 1)?;
            at_least("--steps", *steps as u64, 1)?;
            at_least("--batch", *batch as u64, 1)?;
            at_least("--seq", *seq as u64, 1)
        }
        Command::Params { pal_dim: Some(dim), .. } => at_least("--pal-dim", *dim as u64, 1),
        Command::Demo { steps_per_epoch, epochs, .. } => {
            at_least("--steps-per-epoch", *steps_per_epoch as u64, 1)?;
            at_least("--epochs", *epochs as u64, 1)
        }
        Command::Encode { batch_size, max_length, .. } => {
            at_least("--batch-size", *batch_size as u64, 1)?;
            max_length.map_or(Ok(()), |length| at_least("--max-length", length as u64, 2))
        }
        _ => Ok(()),
    }
}

fn run(cli: Cli, given: Vec<String>) -> Result<()> {
    match cli.command {
        Command::Devices { adapter } => devices(adapter.backend.as_deref()),
        Command::Train { adapter, model, glue_dir, output, run, resume, overwrite, save_init } => {
            let gpu = adapter.open()?;
            let start = commands::Start { resume, overwrite, save_init, given };
            let data = commands::DataDirs { glue: glue_dir, custom: run.custom.clone() };
            commands::train(&gpu, &model, &data, &output, run.settings(), &start)
        }
        Command::Eval { adapter, checkpoint, data } => {
            commands::eval(&adapter.open()?, &checkpoint, &data.dirs())
        }
        Command::Predict { adapter, checkpoint, data, output } => {
            commands::predict(&adapter.open()?, &checkpoint, &data.dirs(), &output)
        }
        Command::Params { model, method, pal_dim, tasks } => {
            for line in commands::params(&model_config(&model)?, method, pal_dim, &tasks)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Demo { adapter, output, steps_per_epoch, epochs, seed } => {
            commands::demo(&adapter.open()?, &output, steps_per_epoch, epochs, seed)
        }
        Command::Serve { adapter, serve } => pals::serve::serve(&serve.options(adapter.choice())),
        Command::Bench { adapter, serve: Some(checkpoint), concurrency, requests, .. } => {
            let bench = pals::bench::serve::ServeBench {
                checkpoint,
                adapter: adapter.choice(),
                concurrency,
                requests,
            };
            for line in pals::bench::serve::serve_bench(&bench)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Bench { memory: Some(model), batch, seq, precision, .. } => {
            let config = model_config(&model)?;
            let mixed = precision.precision() == Precision::Mixed;
            for line in pals::model::memory::memory_report(&config, batch, seq, mixed) {
                println!("{line}");
            }
            Ok(())
        }
        Command::Encode { adapter, model, pooling, normalize, input, output, batch_size, max_length } => {
            let gpu = adapter.open()?;
            let text = match &input {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
                }
                None => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
            };
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            let mut encoder = Encoder::from_dir(&gpu, &model)?;
            let max_length = max_length.unwrap_or(encoder.default_max_length());
            let mut embeddings = encoder.encode(&lines, pooling, batch_size, max_length)?;
            if normalize {
                pals::encode::normalize(&mut embeddings);
            }
            write_embeddings(output.as_deref(), &embeddings)
        }
        Command::Bench { allreduce: true, reps, .. } => {
            let comm = pals::dist::world();
            for line in pals::bench::allreduce::allreduce_report(comm, reps) {
                if comm.rank() == 0 {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Command::Bench { adapter, train: Some(model), method, steps, batch, seq, precision, .. } => {
            let gpu = adapter.open()?;
            let precision = precision.precision();
            let config = model_config(&model)?;
            let bench = pals::bench::TrainBench { config, method, batch, seq, steps, precision };
            for line in pals::bench::train_bench(&gpu, &bench)?.lines() {
                println!("{line}");
            }
            Ok(())
        }
        Command::Bench { adapter, reps, tiles, .. } => {
            let gpu = adapter.open()?;
            println!("adapter: {}", gpu.describe());
            if let Some(shape) = tiles {
                let op = parse_tiles_shape(&shape)?;
                for row in pals::bench::tile_report(&gpu, &op, reps)? {
                    println!("{row}");
                }
                return Ok(());
            }
            for row in pals::bench::matmul_report(&gpu, reps)? {
                println!("{row}");
            }
            for row in pals::bench::attention_report(&gpu)? {
                println!("{row}");
            }
            let tuning = *gpu.tune.spent.lock().unwrap();
            println!("tile tuning this run: {:.2} s", tuning.as_secs_f64());
            Ok(())
        }
    }
}

/// A named size (base, minilm) or a model directory's config.json.
fn model_config(model: &str) -> Result<pals::model::BertConfig> {
    match model {
        "base" | "bert-base" => Ok(pals::model::BertConfig::base()),
        "minilm" => Ok(pals::model::BertConfig::minilm()),
        dir => Ok(pals::model::BertConfig::from_file(Path::new(dir).join("config.json"))?),
    }
}

/// JSON lines on standard output, or a file (.npy by extension); files are written to a
/// temporary name and renamed, so an existing file is never left half-written.
fn write_embeddings(output: Option<&Path>, embeddings: &[Vec<f32>]) -> Result<()> {
    let Some(path) = output else {
        let stdout = std::io::stdout();
        let mut lock = std::io::BufWriter::new(stdout.lock());
        pals::encode::write_jsonl(&mut lock, embeddings)?;
        return Ok(lock.flush()?);
    };
    let temporary = path.with_extension("partial");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&temporary).with_context(|| format!("creating {}", temporary.display()))?,
    );
    if path.extension().is_some_and(|e| e == "npy") {
        pals::encode::write_npy(&mut file, embeddings)?;
    } else {
        pals::encode::write_jsonl(&mut file, embeddings)?;
    }
    file.flush()?;
    drop(file);
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn devices(backend: Option<&str>) -> Result<()> {
    let adapters = pals::gpu::list_adapters(backend)?;
    if adapters.is_empty() {
        anyhow::bail!(pals::gpu::GpuError::NoAdapter(String::new()));
    }
    for (index, adapter) in adapters.iter().enumerate() {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        let optional: Vec<&str> = pals::gpu::OPTIONAL_FEATURES
            .iter()
            .filter(|(f, _)| features.contains(*f))
            .map(|(_, name)| *name)
            .collect();
        println!("[{index}] {}", info.name);
        println!(
            "    backend {:?}, type {:?}, driver {} {}",
            info.backend, info.device_type, info.driver, info.driver_info
        );
        println!(
            "    features: {}",
            if optional.is_empty() { "none".to_string() } else { optional.join(", ") }
        );
        println!("    cooperative matrices: {}", pals::gpu::cooperative_matrix_summary(adapter));
        println!("    matmul: {}", pals::kernels::matmul::kernel_summary(&info, features));
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, storage buffers per stage {}, \
             workgroup memory {} KiB, invocations per workgroup {}",
            limits.max_storage_buffer_binding_size >> 20,
            limits.max_buffer_size >> 20,
            limits.max_storage_buffers_per_shader_stage,
            limits.max_compute_workgroup_storage_size >> 10,
            limits.max_compute_invocations_per_workgroup
        );
    }
    Ok(())
}

/// `--tiles MxNxK[:FORM]`: the product to measure, x·Wᵀ (`nt`) unless a form is named.
fn parse_tiles_shape(shape: &str) -> anyhow::Result<pals::kernels::matmul::Matmul> {
    let (dims, form) = shape.split_once(':').unwrap_or((shape, "nt"));
    let wanted =
        || format!("config error: --tiles wants MxNxK or MxNxK:FORM (FORM nn, nt, tn or tt), got '{shape}'");
    let dims: Vec<usize> = dims
        .split('x')
        .map(|d| d.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!(wanted()))?;
    let [m, n, k] = dims[..] else { anyhow::bail!(wanted()) };
    let (trans_a, trans_b) = match form {
        "nn" => (false, false),
        "nt" => (false, true),
        "tn" => (true, false),
        "tt" => (true, true),
        _ => anyhow::bail!(wanted()),
    };
    Ok(pals::kernels::matmul::Matmul { trans_a, trans_b, ..pals::kernels::matmul::Matmul::new(m, n, k) })
}
