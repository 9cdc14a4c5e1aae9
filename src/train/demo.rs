//! `pals demo`: built-in synthetic tasks a tiny random BERT-PALs learns in about two minutes on 2 CPU cores
//! on any adapter, with no download. Token ids: 0 [PAD], 1 [CLS], 2 [SEP], 3.. words.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::contract::rng::rng_u32;
use crate::data::cache::{TokenizedExample, TokenizedSplit};
use crate::data::custom::{CustomTask, Kind};
use crate::data::glue::{Label, Split};
use crate::data::source::TaskSource;
use crate::gpu::Gpu;
use crate::model::tasks::MethodName;
use crate::model::{BertConfig, Weights};
use crate::train::trainer::{TaskData, TrainSettings, Trainer};

const CLS: u32 = 1;
const SEP: u32 = 2;
const FIRST_WORD: u32 = 3;
pub const VOCAB: usize = 32;
/// The word whose presence `contains` detects.
const MARKER: u32 = FIRST_WORD;

/// The tiny encoder the demo trains: 2 layers, width 64, 4 heads.
pub fn config() -> BertConfig {
    BertConfig { vocab_size: VOCAB, max_position_embeddings: 40, ..BertConfig::tiny(2, 64, 4) }
}

struct Draw {
    seed: u32,
    stream: u32,
    counter: u32,
}

impl Draw {
    fn below(&mut self, n: u32) -> u32 {
        self.counter += 1;
        rng_u32(self.seed, self.stream, self.counter) % n
    }

    fn word(&mut self) -> u32 {
        FIRST_WORD + 1 + self.below(VOCAB as u32 - FIRST_WORD - 1)
    }

    fn sentence(&mut self, min: u32, max: u32) -> Vec<u32> {
        let len = min + self.below(max - min + 1);
        (0..len).map(|_| self.word()).collect()
    }
}

fn pack(a: &[u32], b: Option<&[u32]>) -> (Vec<u32>, Vec<u32>) {
    let mut ids = vec![CLS];
    ids.extend_from_slice(a);
    ids.push(SEP);
    let mut types = vec![0; ids.len()];
    if let Some(b) = b {
        ids.extend_from_slice(b);
        ids.push(SEP);
        types.resize(ids.len(), 1);
    }
    (ids, types)
}

/// Single sentences; class 1 when the marker word occurs (half of them).
fn contains(draw: &mut Draw) -> (Vec<u32>, Vec<u32>, Label) {
    let mut words = draw.sentence(4, 12);
    let positive = draw.below(2) == 1;
    if positive {
        let at = draw.below(words.len() as u32) as usize;
        words[at] = MARKER;
    }
    let (ids, types) = pack(&words, None);
    (ids, types, Label::Class(positive as u32))
}

/// Pairs; the score (0–5) is how often the marker word occurs in A and B together.
fn count(draw: &mut Draw) -> (Vec<u32>, Vec<u32>, Label) {
    let mut a = draw.sentence(5, 8);
    let mut b = draw.sentence(5, 8);
    let markers = draw.below(6);
    for _ in 0..markers {
        // Distinct positions: a marker only ever replaces another word.
        loop {
            let side = if draw.below(2) == 0 { &mut a } else { &mut b };
            let at = draw.below(side.len() as u32) as usize;
            if side[at] != MARKER {
                side[at] = MARKER;
                break;
            }
        }
    }
    let (ids, types) = pack(&a, Some(&b));
    (ids, types, Label::Score(markers as f32))
}

/// Pairs; class 1 when B is longer than A (never equal).
fn longer(draw: &mut Draw) -> (Vec<u32>, Vec<u32>, Label) {
    let a = draw.sentence(3, 10);
    let mut b = draw.sentence(3, 10);
    if a.len() == b.len() {
        b.push(draw.word());
    }
    let (ids, types) = pack(&a, Some(&b));
    (ids, types, Label::Class((b.len() > a.len()) as u32))
}

type Maker = fn(&mut Draw) -> (Vec<u32>, Vec<u32>, Label);

fn split(task: &str, split: Split, make: Maker, count: usize, seed: u32, stream: u32) -> TokenizedSplit {
    let mut draw = Draw { seed, stream, counter: 0 };
    let examples = (0..count)
        .map(|index| {
            let (ids, type_ids, label) = make(&mut draw);
            TokenizedExample { ids, type_ids, label: Some(label), index }
        })
        .collect();
    TokenizedSplit { task: task.to_string(), split, examples, skipped: 0, cached: false }
}

/// The three demo tasks, made here rather than read from a folder, scored as custom tasks
/// are: accuracy (and macro-F1), Pearson/Spearman, accuracy (and macro-F1).
pub fn tasks(seed: u32) -> Vec<TaskData> {
    use Kind::{Classification, Regression};
    let specs: [(&str, Kind, Maker); 3] = [
        ("contains", Classification, contains),
        ("count", Regression, count),
        ("longer", Classification, longer),
    ];
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, kind, make))| {
            let stream = 100 * (i as u32 + 1);
            let labels = if kind == Classification { vec!["0".into(), "1".into()] } else { Vec::new() };
            let task = CustomTask { name: name.to_string(), dir: PathBuf::new(), kind, labels };
            TaskData::new(
                TaskSource::Custom(task),
                split(name, Split::Train, make, 3000, seed, stream),
                vec![(name.to_string(), split(name, Split::Dev, make, 400, seed, stream + 1))],
            )
        })
        .collect()
}

/// How the demo trains: PALs of 24 dimensions, a high learning rate for a tiny model.
pub fn settings(steps_per_epoch: usize, epochs: usize, seed: u32) -> TrainSettings {
    TrainSettings {
        tasks: tasks(seed).iter().map(|t| t.spec.name.clone()).collect(),
        method: MethodName::Pals,
        pal_dim: Some(24),
        lr: 1e-3,
        epochs,
        steps_per_epoch,
        seed,
        weight_decay: 0.0,
        ..TrainSettings::default()
    }
}

/// Gets every kernel the demo runs compiled before its progress bar starts, saying so. On a
/// CPU adapter LLVM takes a fraction of a second per kernel the first time a driver sees it
/// (Mesa then keeps it on disk), which is most of the demo's first step on a fresh machine.
/// Matmul tiles are not measured: on the demo's tiny shapes the measuring costs more than the
/// best tile saves (measured: 113 s of CPU for the whole demo untuned, 153 s tuned).
pub fn warm_up(gpu: &Gpu, settings: &TrainSettings, config: &BertConfig, shared: &Weights) -> Result<()> {
    gpu.tune.measure.store(false, Ordering::Relaxed);
    let started = Instant::now();
    let compiled = || gpu.pipelines.lock().unwrap().len();
    let before = compiled();
    eprintln!("compiling the kernels (a driver's first run only; later runs start at once)");
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if std::io::stderr().is_terminal() {
                    let seconds = started.elapsed().as_secs_f64();
                    eprint!("\r  {} kernels compiled, {seconds:.0} s", compiled() - before);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let result = step_each_task(gpu, settings, config, shared);
        done.store(true, Ordering::Relaxed);
        result
    });
    if std::io::stderr().is_terminal() {
        eprint!("\r");
    }
    eprintln!("  {} kernels compiled in {:.1} s", compiled() - before, started.elapsed().as_secs_f64());
    result
}

/// One training step and a small evaluation per task, each in a throwaway trainer of its own
/// (so that every task's loss runs), which compiles every kernel training uses.
fn step_each_task(gpu: &Gpu, settings: &TrainSettings, config: &BertConfig, shared: &Weights) -> Result<()> {
    for task in tasks(settings.seed) {
        let settings = TrainSettings {
            tasks: vec![task.spec.name.clone()],
            max_eval_examples: Some(settings.batch_size),
            ..settings.clone()
        };
        // Nothing is written: only `run` and `save` write to the output directory.
        let scratch = std::env::temp_dir();
        let mut trainer = Trainer::new(
            gpu,
            settings,
            config.clone(),
            shared,
            &BTreeMap::new(),
            vec![task],
            &scratch,
            &scratch,
        )?;
        trainer.train_step()?;
        trainer.evaluate()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_data_is_balanced_and_deterministic() {
        let a = tasks(7);
        let b = tasks(7);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.train.examples.len(), 3000);
            assert!(x.train.examples.iter().zip(&y.train.examples).all(|(p, q)| p.ids == q.ids));
            assert!(x.train.examples.iter().all(|e| e.ids.len() <= config().max_position_embeddings));
        }
        let positives = a[0].train.examples.iter().filter(|e| e.label == Some(Label::Class(1))).count();
        assert!((1300..1700).contains(&positives), "{positives}");
    }

    /// The point of the warm-up: once it is done, training and evaluating compile nothing.
    #[test]
    fn warm_up_compiles_every_kernel_the_demo_runs() {
        let gpu = Gpu::from_env().expect("no GPU adapter: install lavapipe (see README)");
        let settings = TrainSettings { max_eval_examples: Some(40), ..settings(4, 1, 5) };
        let shared = crate::model::random_weights(&config(), 5);
        warm_up(&gpu, &settings, &config(), &shared).unwrap();
        let compiled = gpu.pipelines.lock().unwrap().len();
        let scratch = std::env::temp_dir();
        let mut trainer =
            Trainer::new(&gpu, settings, config(), &shared, &BTreeMap::new(), tasks(5), &scratch, &scratch)
                .unwrap();
        for _ in 0..4 {
            trainer.train_step().unwrap();
        }
        trainer.evaluate().unwrap();
        assert_eq!(gpu.pipelines.lock().unwrap().len(), compiled);
    }

    #[test]
    fn unmeasured_choice_is_the_default_and_not_remembered() {
        let dir = std::env::temp_dir().join(format!("pals-demo-tune-{}", std::process::id()));
        let cache = crate::gpu::TuneCache::at(dir.join("tune.json"));
        cache.measure.store(false, Ordering::Relaxed);
        let candidates = vec!["default".to_string(), "fast".to_string()];
        let chosen = cache.choose("k", &candidates, |_| panic!("measured with measuring off"));
        assert_eq!(chosen, "default");
        assert_eq!(cache.get("k"), None);
        assert!(!dir.join("tune.json").exists());
    }
}
