//! What `pals train`, `eval`, `predict`, `params` and `demo` do; src/main.rs parses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::data::Tokenizer;
use crate::data::batch::{BatchOptions, bucketed_order, make_batch, padding_fraction};
use crate::data::cache::tokenized_split;
use crate::data::glue::{Split, Task};
use crate::gpu::Gpu;
use crate::model::tasks::{Method, MethodName, TaskSpec, param_count, task_param_count};
use crate::model::{BertConfig, Weights, param_count as encoder_params};
use crate::train::checkpoint::{Checkpoint, resolve};
use crate::train::inference::{InferenceModel, evaluate_tasks};
use crate::train::log::LogRecords;
use crate::train::metrics::format_table;
use crate::train::trainer::{TaskData, TrainSettings, Trainer, load_glue_tasks};

/// Where tokenized GLUE splits are cached.
fn token_cache() -> Option<PathBuf> {
    crate::gpu::cache_dir().map(|dir| dir.join("tokenized"))
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    let style =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}")
            .expect("a valid template");
    bar.set_style(style);
    bar
}

/// Ctrl-C sets the flag; the loop then saves a resumable checkpoint and stops.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let setter = flag.clone();
    // Only one handler per process: a second call (tests) keeps the first.
    let _ = ctrlc::set_handler(move || setter.store(true, Ordering::SeqCst));
    flag
}

fn apply_dropout(config: &mut BertConfig, dropout: Option<f64>) {
    if let Some(p) = dropout {
        config.hidden_dropout_prob = p;
        config.attention_probs_dropout_prob = p;
    }
}

/// Trains from a model directory (or resumes from `output/last`), then prints the dev table
/// and writes the loss/score plot.
pub fn train(
    gpu: &Gpu,
    model_dir: &Path,
    glue_dir: &Path,
    output: &Path,
    settings: TrainSettings,
    resume: bool,
    save_init: bool,
) -> Result<()> {
    let last = output.join("last");
    let resuming = resume && last.join("shared.safetensors").exists();
    let checkpoint = if resuming { Some(Checkpoint::load(&last, true)?) } else { None };
    let settings = match &checkpoint {
        Some(c) => {
            let saved: TrainSettings =
                serde_json::from_value(c.run.clone()).context("reading the checkpoint's run.json")?;
            if saved.tasks != settings.tasks || saved.method != settings.method {
                bail!(
                    "--resume: {} was trained with --tasks {} --method {}",
                    last.display(),
                    saved.tasks.join(","),
                    saved.method
                );
            }
            TrainSettings { stop_after: settings.stop_after, ..saved }
        }
        None => settings,
    };
    let (mut config, shared) = crate::model::load::load_model_dir(model_dir)?;
    apply_dropout(&mut config, settings.dropout);
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let cache = token_cache();
    let data = load_glue_tasks(&tokenizer, glue_dir, &settings.tasks, settings.max_length, cache.as_deref())?;
    report_data(&data, &settings);
    let mut trainer =
        Trainer::new(gpu, settings, config, &shared, &BTreeMap::new(), data, output, model_dir)?;
    if let Some(checkpoint) = &checkpoint {
        trainer.restore(checkpoint)?;
        eprintln!("resuming from {} at step {}", last.display(), trainer.state.step);
    } else if save_init {
        trainer.save("init", false)?;
    }
    finish(&mut trainer, output)
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
    let bar = progress_bar();
    let started = std::time::Instant::now();
    let scores = trainer.run(&interrupted, &bar)?;
    bar.finish_and_clear();
    let records = LogRecords::read(&output.join("metrics.jsonl"))?;
    crate::train::plot::write_svg(&output.join("training.svg"), &records)?;
    eprintln!(
        "{} steps in {:.1} s; checkpoint {}; plot {}",
        trainer.state.step,
        started.elapsed().as_secs_f64(),
        output.join("last").display(),
        output.join("training.svg").display()
    );
    if interrupted.load(Ordering::SeqCst) {
        eprintln!("interrupted: continue with the same command and --resume");
    } else if !scores.is_empty() {
        println!("{}", format_table(&scores));
    }
    Ok(())
}

/// A checkpoint loaded for inference (for eval and predict): its model without gradients
/// or optimizer state, its tasks' data and its tokenizer.
fn load_for_eval<'g>(
    gpu: &'g Gpu,
    checkpoint_dir: &Path,
    glue_dir: &Path,
) -> Result<(InferenceModel<'g>, Vec<TaskData>, Tokenizer, PathBuf)> {
    let dir = resolve(checkpoint_dir);
    let model = InferenceModel::load(gpu, &dir)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let cache = token_cache();
    let settings = &model.settings;
    let data = load_glue_tasks(&tokenizer, glue_dir, &settings.tasks, settings.max_length, cache.as_deref())?;
    Ok((model, data, tokenizer, dir))
}

/// Prints the dev metrics of a checkpoint (an output directory's `best/` if present).
pub fn eval(gpu: &Gpu, checkpoint: &Path, glue_dir: &Path) -> Result<()> {
    let (mut model, data, _, dir) = load_for_eval(gpu, checkpoint, glue_dir)?;
    eprintln!("evaluating {}", dir.display());
    let scores = evaluate_tasks(&data, None, &mut |task, split| model.predict(task, split))?;
    println!("{}", format_table(&scores));
    Ok(())
}

/// The GLUE submission files of a checkpoint's tasks: `index<TAB>prediction`.
pub fn predict(gpu: &Gpu, checkpoint: &Path, glue_dir: &Path, output: &Path) -> Result<()> {
    let (mut model, data, tokenizer, _) = load_for_eval(gpu, checkpoint, glue_dir)?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let max_len = model.settings.max_length;
    for (index, t) in data.iter().enumerate() {
        let task = Task::from_name(&t.spec.name)?;
        let mut files = vec![(submission_name(task, Split::Test), task, Split::Test)];
        if task == Task::MNLI {
            files.push(("MNLI-mm".into(), task, Split::TestMismatched));
            files.push(("AX".into(), Task::AX, Split::Test));
        }
        for (file, read_task, split) in files {
            let tokens = match tokenized_split(
                &tokenizer,
                glue_dir,
                read_task,
                split,
                max_len,
                token_cache().as_deref(),
            ) {
                Ok(tokens) => tokens,
                Err(error) => {
                    eprintln!("skipping {file}.tsv: {error}");
                    continue;
                }
            };
            let predictions = model.predict(index, &tokens)?;
            let mut text = String::from("index\tprediction\n");
            for (i, p) in predictions.iter().enumerate() {
                let label = match task.is_regression() {
                    true => format!("{:.3}", p.clamp(0.0, 5.0)),
                    false => task.label_name(*p as u32).unwrap_or("0").to_string(),
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

fn submission_name(task: Task, split: Split) -> String {
    match (task, split) {
        (Task::MNLI, Split::Test) => "MNLI-m".into(),
        _ => task.name().into(),
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
    let specs: Vec<TaskSpec> = tasks
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
    let settings = TrainSettings {
        tasks: data.iter().map(|t| t.spec.name.clone()).collect(),
        method: MethodName::Pals,
        pal_dim: Some(24),
        lr: 1e-3,
        epochs,
        steps_per_epoch,
        seed,
        weight_decay: 0.0,
        ..TrainSettings::default()
    };
    let shared: Weights = crate::model::random_weights(&config, seed);
    eprintln!("pals demo on {}", gpu.describe());
    eprintln!(
        "a random 2-layer BERT (width 64) with PALs learns: contains (is the marker word in the sentence?), \
         count (how many markers in the pair, 0-5), longer (is B longer than A?)"
    );
    let mut trainer = Trainer::new(gpu, settings, config, &shared, &BTreeMap::new(), data, output, output)?;
    finish(&mut trainer, output)?;
    let baseline = "chance: contains acc 50, count pearson/spearman 0, longer acc 50";
    eprintln!("{baseline}");
    Ok(())
}
