//! What `pals train`, `eval`, `predict`, `params` and `demo` do; src/main.rs parses.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::data::Tokenizer;
use crate::data::batch::{BatchOptions, bucketed_order, make_batch, padding_fraction};
use crate::data::custom::{CustomArg, CustomTask};
use crate::data::glue::{Split, Task};
use crate::data::source::TaskSource;
use crate::gpu::Gpu;
use crate::model::tasks::{Method, MethodName, TaskSpec, param_count, task_param_count};
use crate::model::{BertConfig, Weights, param_count as encoder_params};
use crate::train::checkpoint::Checkpoint;
use crate::train::inference::{InferenceModel, evaluate_tasks};
use crate::train::log::LogRecords;
use crate::train::metrics::format_table;
use crate::train::trainer::{TaskData, TrainSettings, Trainer, load_tasks};
use crate::train::{checks, rundir};

/// Where tokenized GLUE splits are cached.
fn token_cache() -> Option<PathBuf> {
    crate::gpu::cache_dir().map(|dir| dir.join("tokenized"))
}

fn progress_bar() -> indicatif::ProgressBar {
    if crate::dist::world().rank() != 0 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    let style =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}")
            .expect("a valid template");
    bar.set_style(style);
    bar
}

/// Ctrl-C, SIGTERM or SIGHUP (what `timeout`, Slurm, `docker stop` and systemd send) sets
/// the flag; the loop then finishes its step, saves a resumable checkpoint and stops. A
/// second signal stops at once: the checkpoint swap keeps the last complete save intact.
fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let flag = FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = flag.clone();
        let installed = ctrlc::set_handler(move || {
            if setter.swap(true, Ordering::SeqCst) {
                eprintln!("second interrupt: stopping now without saving");
                std::process::exit(130);
            }
        });
        if let Err(error) = installed {
            eprintln!("warning: no signal handler ({error}): an interrupt will not save a checkpoint");
        }
        flag
    });
    flag.store(false, Ordering::SeqCst);
    flag.clone()
}

fn apply_dropout(config: &mut BertConfig, dropout: Option<f64>) {
    if let Some(p) = dropout {
        config.hidden_dropout_prob = p;
        config.attention_probs_dropout_prob = p;
    }
}

/// Where a command's data is: GLUE's folder (needed only for GLUE tasks) and the
/// `--task NAME=DIR[:KIND]` flags: the custom tasks `train` trains on, or for `eval` and
/// `predict` folders that replace those the checkpoint recorded (data that moved).
#[derive(Clone, Debug, Default)]
pub struct DataDirs {
    pub glue: Option<PathBuf>,
    pub custom: Vec<CustomArg>,
}

impl DataDirs {
    /// GLUE's folder alone.
    pub fn glue(dir: &Path) -> DataDirs {
        DataDirs { glue: Some(dir.to_path_buf()), custom: Vec::new() }
    }
}

/// How `pals train` treats an output directory that already holds a run.
#[derive(Clone, Debug, Default)]
pub struct Start {
    /// Continue from OUTPUT/last (a directory without a run starts a new one).
    pub resume: bool,
    /// Replace a run that is there.
    pub overwrite: bool,
    /// Save OUTPUT/init before the first step.
    pub save_init: bool,
    /// The settings given on the command line (field names, e.g. "epochs"): on `--resume`
    /// those that differ from the saved run are refused; the others are the saved run's.
    pub given: Vec<String>,
}

/// Trains from a model directory (or resumes from `output/last`), then prints the dev table
/// and writes the loss/score plot. The output directory is locked for the whole run.
pub fn train(
    gpu: &Gpu,
    model_dir: &Path,
    data_dirs: &DataDirs,
    output: &Path,
    settings: TrainSettings,
    start: &Start,
) -> Result<()> {
    checks::task_flags(&settings.tasks, &data_dirs.custom)?;
    let custom = data_dirs.custom.iter().map(CustomTask::from_arg).collect::<Result<Vec<_>, _>>()?;
    let settings = checks::checked(TrainSettings { custom, ..settings })?;
    crate::train::trainer::check_precision(gpu, settings.precision)?;
    if start.resume && start.overwrite {
        bail!("config error: --resume and --overwrite exclude each other");
    }
    // Under mpirun: every rank must have been given the same run (checked before any work).
    crate::dist::check_same_settings(crate::dist::world(), &serde_json::to_value(&settings)?)?;
    // Rank 0 alone locks, recovers and checks the run directory; the others read it after.
    let lead = crate::dist::world().rank() == 0;
    let _lock = if lead { Some(rundir::lock(output)?) } else { None };
    for note in if lead { rundir::recover(output)? } else { Vec::new() } {
        eprintln!("{note}");
    }
    let last = output.join("last");
    let resuming = start.resume && last.join("shared.safetensors").exists();
    if !lead {
        // Rank 0 decides for every rank; a refusal there stops them all.
    } else if !resuming && rundir::holds_run(output) {
        if start.overwrite {
            eprintln!("--overwrite: removing the run in {}", output.display());
            rundir::clear(output)?;
        } else if start.resume {
            bail!(
                "output error: {} holds a run but no last/ checkpoint to resume; start it again with --overwrite",
                output.display()
            );
        } else {
            bail!(
                "output error: {} already holds a run; continue it with --resume, or replace it with --overwrite",
                output.display()
            );
        }
    } else if start.resume && !resuming {
        eprintln!("nothing to resume in {}: starting a new run", output.display());
    }
    crate::dist::wait_for_all(crate::dist::world());
    let resuming = start.resume && last.join("shared.safetensors").exists();
    let checkpoint = if resuming { Some(Checkpoint::load(&last, true)?) } else { None };
    let settings = match &checkpoint {
        Some(c) => {
            let run_json = last.join("run.json");
            let saved: TrainSettings = serde_json::from_value(c.run.clone())
                .with_context(|| format!("reading {}", run_json.display()))?;
            let merged = checks::resume_settings(&saved, &settings, &start.given, &last)?;
            check_custom_data(&saved, &merged, &last)?;
            merged
        }
        None => settings,
    };
    let (mut config, shared) = crate::model::load::load_model_dir(model_dir)?;
    check_max_length(settings.max_length, &config, &model_dir.join("config.json"))?;
    apply_dropout(&mut config, settings.dropout);
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    tokenizer.check_fits(config.vocab_size)?;
    let cache = token_cache();
    let glue_dir = data_dirs.glue.as_deref();
    let data =
        load_tasks(&tokenizer, glue_dir, &settings.sources()?, settings.max_length, cache.as_deref(), true)?;
    check_splits(&data, glue_dir, true)?;
    if crate::dist::world().rank() == 0 {
        report_data(&data, &settings);
    }
    let mut trainer =
        Trainer::new(gpu, settings, config, &shared, &BTreeMap::new(), data, output, model_dir)?;
    if let Some(checkpoint) = &checkpoint {
        trainer.restore(checkpoint)?;
        eprintln!("resuming from {} at step {}", last.display(), trainer.state.step);
        if start.save_init {
            eprintln!("note: --save-init does nothing on --resume: init/ is the first run's");
        }
    } else if start.save_init {
        trainer.save("init", false)?;
    }
    finish(&mut trainer, output)
}

/// Refuses to resume a run whose custom tasks' data (read again from the folders of
/// `merged`) has other classes than the checkpoint in `last` was trained with.
fn check_custom_data(saved: &TrainSettings, merged: &TrainSettings, last: &Path) -> Result<()> {
    for (was, task) in saved.custom.iter().zip(&merged.custom) {
        let arg = CustomArg { name: task.name.clone(), dir: task.dir.clone(), kind: Some(was.kind) };
        let now = CustomTask::from_arg(&arg)?;
        was.check_same(&now, &format!("the checkpoint {}", last.display())).context("data error")?;
    }
    Ok(())
}

/// Sequences longer than the model's position table cannot be embedded: refused at start.
fn check_max_length(max_length: usize, config: &BertConfig, config_path: &Path) -> Result<()> {
    if max_length > config.max_position_embeddings {
        bail!(
            "config error: --max-length {max_length} is longer than the model's max_position_embeddings {} ({})",
            config.max_position_embeddings,
            config_path.display()
        );
    }
    Ok(())
}

/// An empty split is an error naming its file: nothing to train on, or nothing to score.
fn check_splits(data: &[TaskData], glue_dir: Option<&Path>, training: bool) -> Result<()> {
    for t in data {
        let mut splits = t.dev.iter().map(|(_, d)| d).collect::<Vec<_>>();
        if training {
            splits.insert(0, &t.train);
        }
        for split in splits {
            if split.examples.is_empty() {
                let path = t.source.split_path(glue_dir, split.split);
                bail!("data error: {} {} has no examples ({path})", t.spec.name, split.split);
            }
        }
    }
    Ok(())
}

/// Examples per task, and the padding a pass of length-bucketed batches carries.
fn report_data(data: &[TaskData], settings: &TrainSettings) {
    let options =
        BatchOptions { batch_size: settings.batch_size, pad_to_batch: true, seq_multiple: 8, pad_id: 0 };
    for t in data {
        let skipped = if t.train.skipped > 0 {
            format!(" ({} malformed rows skipped)", t.train.skipped)
        } else {
            String::new()
        };
        let dev: usize = t.dev.iter().map(|(_, d)| d.examples.len()).sum();
        let order = bucketed_order(&t.train.lengths(), settings.batch_size, settings.seed);
        let batches: Vec<_> =
            order.iter().map(|rows| make_batch(&t.train.examples, rows, &options)).collect();
        let padding = 100.0 * padding_fraction(&batches);
        eprintln!(
            "{:<8} train {:>6}  dev {:>5}  padding {padding:.1}% of train tokens{skipped}",
            t.spec.name,
            t.train.examples.len(),
            dev
        );
    }
}

fn finish(trainer: &mut Trainer, output: &Path) -> Result<()> {
    let interrupted = interrupt_flag();
    // Without a terminal the bar is hidden and the trainer prints plain lines instead.
    let bar = if std::io::stderr().is_terminal() { progress_bar() } else { indicatif::ProgressBar::hidden() };
    let started = std::time::Instant::now();
    let scores = trainer.run(&interrupted, &bar)?;
    bar.finish_and_clear();
    if crate::dist::world().rank() != 0 {
        return Ok(());
    }
    let log_path = output.join("metrics.jsonl");
    let (records, torn) = LogRecords::read_with_torn(&log_path)?;
    if let Some(line) = torn {
        eprintln!("note: {} line {line} is torn (a crash cut it short); it was skipped", log_path.display());
    }
    crate::train::plot::write_svg(&output.join("training.svg"), &records)?;
    eprintln!(
        "{} steps in {:.1} s; checkpoint {}; plot {}",
        trainer.state.step,
        started.elapsed().as_secs_f64(),
        output.join("last").display(),
        output.join("training.svg").display()
    );
    if interrupted.load(Ordering::SeqCst) {
        bail!(
            "interrupted: saved a resumable checkpoint at step {} in {}; continue with the same command \
             and --resume",
            trainer.state.step,
            output.join("last").display()
        );
    }
    if !scores.is_empty() {
        println!("{}", format_table(&scores));
    }
    Ok(())
}

/// A checkpoint loaded for inference (for eval and predict): its model without gradients
/// or optimizer state, its tasks' data (dev and test, no train) and its tokenizer.
fn load_for_eval<'g>(
    gpu: &'g Gpu,
    checkpoint_dir: &Path,
    data_dirs: &DataDirs,
) -> Result<(InferenceModel<'g>, Vec<TaskData>, Tokenizer, PathBuf)> {
    let dir = rundir::checkpoint_to_read(checkpoint_dir)?;
    let checkpoint = Checkpoint::load(&dir, false)?;
    let run_json = dir.join("run.json");
    let settings: TrainSettings = serde_json::from_value(checkpoint.run.clone())
        .with_context(|| format!("reading {}", run_json.display()))?;
    let sources = moved_custom_tasks(settings.sources()?, &data_dirs.custom, &dir)?;
    // A task without its file must not be scored with a freshly initialised head.
    for source in &sources {
        let name = source.name();
        if !checkpoint.tasks.contains_key(name) {
            let file = dir.join("tasks").join(format!("{name}.safetensors"));
            bail!("weights error: {} is missing: the checkpoint has no weights for {name}", file.display());
        }
    }
    let model = InferenceModel::from_checkpoint(gpu, &checkpoint)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    tokenizer.check_fits(checkpoint.config.vocab_size)?;
    let cache = token_cache();
    let glue_dir = data_dirs.glue.as_deref();
    let data = load_tasks(&tokenizer, glue_dir, &sources, settings.max_length, cache.as_deref(), false)?;
    check_splits(&data, glue_dir, false)?;
    Ok((model, data, tokenizer, dir))
}

/// The checkpoint's tasks with the custom ones named by `--task NAME=DIR` read from DIR
/// instead of the folder they were trained from. The kind and classes are the checkpoint's.
fn moved_custom_tasks(
    mut sources: Vec<TaskSource>,
    moved: &[CustomArg],
    dir: &Path,
) -> Result<Vec<TaskSource>> {
    for arg in moved {
        let found = sources.iter_mut().find_map(|s| match s {
            TaskSource::Custom(task) if task.name == arg.name => Some(task),
            _ => None,
        });
        let Some(task) = found else {
            let custom: Vec<&str> =
                sources.iter().filter(|s| matches!(s, TaskSource::Custom(_))).map(|s| s.name()).collect();
            bail!(
                "config error: --task {}: {} has no custom task of that name (its custom tasks: {})",
                arg.name,
                dir.display(),
                if custom.is_empty() { "none".to_string() } else { custom.join(", ") }
            );
        };
        if let Some(kind) = arg.kind.filter(|&k| k != task.kind) {
            bail!(
                "config error: --task {}: {kind}, but {} trained it as {}",
                arg.name,
                dir.display(),
                task.kind
            );
        }
        task.dir = arg.existing_dir().map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    }
    Ok(sources)
}

/// Prints the dev metrics of a checkpoint (an output directory's `best/` if present).
pub fn eval(gpu: &Gpu, checkpoint: &Path, data_dirs: &DataDirs) -> Result<()> {
    let (mut model, data, _, dir) = load_for_eval(gpu, checkpoint, data_dirs)?;
    eprintln!("evaluating {}", dir.display());
    let scores = evaluate_tasks(&data, None, &mut |task, split| model.predict(task, split))?;
    println!("{}", format_table(&scores));
    Ok(())
}

/// The prediction files of a checkpoint's tasks, `index<TAB>prediction`: GLUE's submission
/// files, and `NAME.tsv` with the train file's label strings for each custom task.
pub fn predict(gpu: &Gpu, checkpoint: &Path, data_dirs: &DataDirs, output: &Path) -> Result<()> {
    let (mut model, data, tokenizer, _) = load_for_eval(gpu, checkpoint, data_dirs)?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let max_len = model.settings.max_length;
    for (index, t) in data.iter().enumerate() {
        let source = &t.source;
        let mut files = vec![(submission_name(source), source.clone(), Split::Test)];
        if *source == TaskSource::Glue(Task::MNLI) {
            files.push(("MNLI-mm".into(), source.clone(), Split::TestMismatched));
            files.push(("AX".into(), TaskSource::Glue(Task::AX), Split::Test));
        }
        for (file, read, split) in files {
            let glue_dir = data_dirs.glue.as_deref();
            let tokens = match read.tokenized(&tokenizer, glue_dir, split, max_len, token_cache().as_deref())
            {
                Ok(tokens) => tokens,
                Err(error) => {
                    eprintln!("skipping {file}.tsv: {error}");
                    continue;
                }
            };
            let predictions = model.predict(index, &tokens)?;
            let mut text = String::from("index\tprediction\n");
            for (i, p) in predictions.iter().enumerate() {
                let label = match source.is_regression() {
                    true => format!("{:.3}", source.clamp_score(*p)),
                    false => source.label_name(*p as u32).unwrap_or("0").to_string(),
                };
                text.push_str(&format!("{i}\t{label}\n"));
            }
            let path = output.join(format!("{file}.tsv"));
            crate::train::write_atomic(&path, text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} ({} predictions)", path.display(), predictions.len());
        }
    }
    Ok(())
}

fn submission_name(source: &TaskSource) -> String {
    match source {
        TaskSource::Glue(Task::MNLI) => "MNLI-m".into(),
        _ => source.name().into(),
    }
}

/// Shared, per-task and total parameter counts and the ratio to one model.
pub fn params(
    config: &BertConfig,
    name: MethodName,
    pal_dim: Option<usize>,
    tasks: &[String],
) -> Result<Vec<String>> {
    let settings = TrainSettings { method: name, pal_dim, ..TrainSettings::default() };
    let method = settings.method(config)?;
    // Separate models train as `shared` ones but count an encoder per task.
    let counted = if name == MethodName::Separate { Method::Separate } else { method };
    let specs: Vec<TaskSpec> = checks::task_names(tasks)?
        .iter()
        .map(|name| Task::from_name(name).map(|t| TaskSpec::new(t.name(), t.num_labels())))
        .collect::<Result<_, _>>()?;
    let shared = encoder_params(config);
    let mut lines = vec![format!("{:<10} {:>14}", "shared", shared)];
    for spec in &specs {
        let (terms, head) = task_param_count(config, &counted, spec);
        let own = terms + head;
        lines.push(format!("{:<10} {:>14}  ({} task-specific + {} head)", spec.name, own, own - head, head));
    }
    let total = param_count(config, &counted, &specs);
    lines.push(format!(
        "{:<10} {:>14}  = {:.3}× one model ({})",
        "total",
        total,
        total as f64 / shared as f64,
        describe(&counted)
    ));
    Ok(lines)
}

fn describe(method: &Method) -> String {
    match method {
        Method::Pals { dim, heads } => format!("pals, {dim} dims, {heads} heads"),
        _ => method.name().to_string(),
    }
}

/// The zero-download demo: a tiny random BERT-PALs learns three synthetic tasks.
pub fn demo(gpu: &Gpu, output: &Path, steps_per_epoch: usize, epochs: usize, seed: u32) -> Result<()> {
    let config = crate::train::demo::config();
    let data = crate::train::demo::tasks(seed);
    let settings = crate::train::demo::settings(steps_per_epoch, epochs, seed);
    let shared: Weights = crate::model::random_weights(&config, seed);
    let _lock = rundir::lock(output)?;
    if rundir::holds_run(output) {
        eprintln!("replacing the previous run in {}", output.display());
        rundir::clear(output)?;
    }
    eprintln!("pals demo on {}", gpu.describe());
    eprintln!(
        "a random 2-layer BERT (width 64) with PALs learns: contains (is the marker word in the sentence?), \
         count (how many markers in the pair, 0-5), longer (is B longer than A?)"
    );
    crate::train::demo::warm_up(gpu, &settings, &config, &shared)?;
    let mut trainer = Trainer::new(gpu, settings, config, &shared, &BTreeMap::new(), data, output, output)?;
    finish(&mut trainer, output)?;
    let baseline = "chance: contains acc 50, count pearson/spearman 0, longer acc 50";
    eprintln!("{baseline}");
    Ok(())
}
