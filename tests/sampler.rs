//! Multi-task sampling: empirical task frequencies against p_i ∝ N_i^α, round robin,
//! determinism, and the per-task batch stream that reshuffles after every pass.

use pals::data::batch::BatchOptions;
use pals::data::cache::{TokenizedExample, TokenizedSplit};
use pals::data::glue::{Label, Split};
use pals::data::sampler::{EpochIterator, Sampling, TaskSampler};

/// Training set sizes of the paper's GLUE tasks (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE).
const SIZES: [usize; 8] = [8551, 67349, 3668, 5749, 363846, 392702, 104743, 2490];
const DRAWS: u64 = 100_000;

/// Frequencies of each task over `DRAWS` steps from `start`.
fn frequencies(sampler: &TaskSampler, tasks: usize, start: u64) -> Vec<f64> {
    let mut counts = vec![0usize; tasks];
    for step in start..start + DRAWS {
        counts[sampler.next(step)] += 1;
    }
    counts.iter().map(|&c| c as f64 / DRAWS as f64).collect()
}

/// Within 1% (absolute) of p_i, p_i ∝ N_i^alpha.
fn assert_matches(what: &str, got: &[f64], sizes: &[usize], alpha: f64) {
    let weights: Vec<f64> = sizes.iter().map(|&n| (n as f64).powf(alpha)).collect();
    let total: f64 = weights.iter().sum();
    for (i, (&g, w)) in got.iter().zip(&weights).enumerate() {
        let p = w / total;
        assert!((g - p).abs() < 0.01, "{what}: task {i} drawn {g:.4}, p = {p:.4}");
    }
}

#[test]
fn proportional_and_sqrt_frequencies_match() {
    for (sampling, alpha) in [(Sampling::Proportional, 1.0), (Sampling::Sqrt, 0.5)] {
        let sampler = TaskSampler::new(&SIZES, sampling, 3, 2400, 42).unwrap();
        let p = sampler.probabilities(0);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_matches(sampling.name(), &p, &SIZES, alpha);
        assert_eq!(sampler.probabilities(2), p, "{sampling:?} does not change over epochs");
        assert_matches(sampling.name(), &frequencies(&sampler, SIZES.len(), 0), &SIZES, alpha);
    }
}

#[test]
fn annealed_frequencies_follow_alpha_per_epoch() {
    let epochs = 5;
    let steps = DRAWS;
    let sampler = TaskSampler::new(&SIZES, Sampling::Annealed, epochs, steps as usize, 7).unwrap();
    for (epoch, alpha) in [(0, 1.0), (1, 0.8), (2, 0.6), (4, 0.2)] {
        assert!((sampler.alpha(epoch) - alpha).abs() < 1e-12, "epoch {epoch}");
        assert_eq!(sampler.epoch(epoch as u64 * steps + 17), epoch);
        let got = frequencies(&sampler, SIZES.len(), epoch as u64 * steps);
        assert_matches(&format!("annealed epoch {epoch}"), &got, &SIZES, alpha);
    }
    // Steps past the end stay in the last epoch.
    assert_eq!(sampler.epoch(10 * steps), epochs - 1);
    // One epoch: α = 1 (no 0/0).
    let single = TaskSampler::new(&SIZES, Sampling::Annealed, 1, 100, 7).unwrap();
    assert_eq!(single.alpha(0), 1.0);
}

#[test]
fn tasks_without_data_are_never_drawn() {
    let sizes = [100, 0, 300];
    let sampler = TaskSampler::new(&sizes, Sampling::Sqrt, 1, 10, 1).unwrap();
    assert_eq!(sampler.probabilities(0)[1], 0.0);
    assert!((0..10_000).all(|step| sampler.next(step) != 1));
    assert!(TaskSampler::new(&[0, 0], Sampling::Proportional, 1, 10, 1).is_err());
    assert!(TaskSampler::new(&[], Sampling::Proportional, 1, 10, 1).is_err());
    assert!(TaskSampler::new(&[5], Sampling::Proportional, 0, 10, 1).is_err());
    assert!(TaskSampler::new(&[5], Sampling::Proportional, 1, 0, 1).is_err());
}

#[test]
fn round_robin_visits_every_task_in_turn() {
    let sampler = TaskSampler::new(&SIZES, Sampling::RoundRobin, 2, 100, 3).unwrap();
    let drawn: Vec<usize> = (0..16).map(|s| sampler.next(s)).collect();
    assert_eq!(drawn, [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]);
    let counts = frequencies(&sampler, SIZES.len(), 5);
    assert!(counts.iter().all(|&c| (c - 1.0 / 8.0).abs() < 1e-4), "{counts:?}");
    assert!(sampler.probabilities(0).iter().all(|&p| p == 1.0 / 8.0));
    // Empty tasks are passed over.
    let sampler = TaskSampler::new(&[4, 0, 9], Sampling::RoundRobin, 1, 10, 3).unwrap();
    assert_eq!((0..5).map(|s| sampler.next(s)).collect::<Vec<_>>(), [0, 2, 0, 2, 0]);
}

#[test]
fn the_seed_decides_the_sequence() {
    let draw = |seed| {
        let sampler = TaskSampler::new(&SIZES, Sampling::Annealed, 3, 1000, seed).unwrap();
        (0..3000).map(|s| sampler.next(s)).collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
}

#[test]
fn sampling_names() {
    for s in Sampling::ALL {
        assert_eq!(Sampling::from_name(s.name()).unwrap(), s);
    }
    assert_eq!(Sampling::from_name("Round_Robin").unwrap(), Sampling::RoundRobin);
    let error = Sampling::from_name("uniform").unwrap_err().to_string();
    assert!(error.contains("proportional, sqrt, annealed, round-robin"), "{error}");
}

/// 203 examples with few distinct lengths, so sorting by length leaves room for shuffling.
fn split(n: usize) -> TokenizedSplit {
    let examples = (0..n)
        .map(|i| {
            let len = 4 + i % 5;
            TokenizedExample {
                ids: vec![i as u32; len],
                type_ids: vec![0; len],
                label: Some(Label::Class(0)),
                index: i,
            }
        })
        .collect();
    TokenizedSplit { task: "SST-2".into(), split: Split::Train, examples, skipped: 0, cached: false }
}

/// The example positions of one pass, batch by batch.
fn pass(it: &mut EpochIterator, batches: usize) -> Vec<Vec<usize>> {
    (0..batches).map(|_| it.next_batch().rows).collect()
}

#[test]
fn epoch_iterator_reshuffles_after_each_pass() {
    let (n, b) = (203usize, 8);
    let batches = n.div_ceil(b);
    let mut it = EpochIterator::new(split(n), BatchOptions::new(b), 11).unwrap();
    let mut passes = Vec::new();
    for p in 0..3 {
        let order = pass(&mut it, batches);
        assert_eq!(it.pass(), p);
        let mut all = order.concat();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "pass {p} holds every example once");
        passes.push(order);
    }
    assert_eq!(it.pass(), 2, "a pass starts on the first batch drawn after the last one");
    it.next_batch();
    assert_eq!(it.pass(), 3);
    assert_ne!(passes[0], passes[1]);
    assert_ne!(passes[1], passes[2]);
    assert_ne!(passes[0].concat(), passes[1].concat(), "examples move, not only whole batches");

    let mut again = EpochIterator::new(split(n), BatchOptions::new(b), 11).unwrap();
    assert_eq!(
        pass(&mut again, 2 * batches),
        [passes[0].clone(), passes[1].clone()].concat(),
        "deterministic"
    );
    let mut other = EpochIterator::new(split(n), BatchOptions::new(b), 12).unwrap();
    assert_ne!(pass(&mut other, batches), passes[0]);

    // Batches carry their examples' tokens and fill to B when asked.
    let options = BatchOptions { pad_to_batch: true, ..BatchOptions::new(b) };
    let mut it = EpochIterator::new(split(n), options, 11).unwrap();
    for _ in 0..batches {
        let batch = it.next_batch();
        assert_eq!(batch.encoder.batch, b);
        for (r, &i) in batch.rows.iter().enumerate() {
            assert_eq!(batch.encoder.ids[r * batch.encoder.seq], i as u32);
        }
    }
    let empty = TokenizedSplit { examples: Vec::new(), ..split(0) };
    assert!(EpochIterator::new(empty, BatchOptions::new(b), 1).is_err());
}
