//! What the commands are given, checked before any model is loaded: every number's range,
//! the names of tasks, sampling, optimizer and clipping; and the rule `--resume` applies to
//! flags that differ from the saved run (it keeps the saved run's settings and refuses
//! flags that would change them, except the two it takes from the command line).

use std::path::Path;

use anyhow::{Result, bail};

use crate::data::custom::CustomArg;
use crate::data::glue::Task;
use crate::data::sampler::Sampling;
use crate::data::source::check_custom_names;
use crate::model::tasks::MethodName;
use crate::train::trainer::TrainSettings;

/// Settings a resumed run takes from the command line; every other one is the saved run's.
pub const RESUME_TAKES: [&str; 2] = ["stop_after", "max_eval_examples"];

/// `value` is at least `min`.
pub fn at_least(flag: &str, value: u64, min: u64) -> Result<()> {
    if value < min {
        bail!("config error: {flag} {value}: must be at least {min}");
    }
    Ok(())
}

/// `value` is a finite number in [low, high], or [low, high) with `open_high`.
pub fn within(flag: &str, value: f64, low: f64, high: f64, open_high: bool) -> Result<()> {
    let below_high = if open_high { value < high } else { value <= high };
    if !(value.is_finite() && value >= low && below_high) {
        let close = if open_high { ")" } else { "]" };
        bail!("config error: {flag} {value}: must be in [{low}, {high}{close}");
    }
    Ok(())
}

/// `value` is a finite number above 0.
pub fn positive(flag: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        bail!("config error: {flag} {value}: must be a number above 0");
    }
    Ok(())
}

/// `value` is a finite number, 0 or above.
pub fn non_negative(flag: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value >= 0.0) {
        bail!("config error: {flag} {value}: must be a number, 0 or above");
    }
    Ok(())
}

/// GLUE task names as GLUE spells them (any case, with or without dashes), each once.
pub fn task_names(tasks: &[String]) -> Result<Vec<String>> {
    if tasks.is_empty() {
        bail!("config error: --tasks is empty");
    }
    let mut names: Vec<String> = Vec::new();
    for given in tasks {
        let task = Task::from_name(given).map_err(|e| anyhow::anyhow!("config error: --tasks: {e}"))?;
        if names.iter().any(|n| n == task.name()) {
            bail!("config error: --tasks names {} twice", task.name());
        }
        names.push(task.name().to_string());
    }
    Ok(names)
}

/// The task flags of `pals train`, before any file is read: at least one task, GLUE names
/// known and each once, custom names clashing with none of them or each other, custom
/// folders that exist.
pub fn task_flags(glue: &[String], custom: &[CustomArg]) -> Result<()> {
    if glue.is_empty() && custom.is_empty() {
        bail!("config error: no tasks: give GLUE tasks with --tasks and/or your own with --task NAME=DIR");
    }
    if !glue.is_empty() {
        task_names(glue)?;
    }
    check_custom_names(custom.iter().map(|c| c.name.as_str()))
        .map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    for arg in custom {
        arg.existing_dir().map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    }
    Ok(())
}

/// The settings with every range and name checked, task names as GLUE spells them.
pub fn checked(settings: TrainSettings) -> Result<TrainSettings> {
    let s = &settings;
    at_least("--batch-size", s.batch_size as u64, 1)?;
    // [CLS] A [SEP] B [SEP]: a pair needs three places before any text.
    at_least("--max-length", s.max_length as u64, 3)?;
    positive("--lr", s.lr as f64)?;
    at_least("--epochs", s.epochs as u64, 1)?;
    at_least("--steps-per-epoch", s.steps_per_epoch as u64, 1)?;
    // The log and the schedule count steps in u32.
    let steps = (s.epochs as u128) * (s.steps_per_epoch as u128);
    if steps > u32::MAX as u128 {
        bail!("config error: --epochs × --steps-per-epoch = {steps} steps: at most {}", u32::MAX);
    }
    within("--warmup", s.warmup, 0.0, 1.0, false)?;
    if let Some(p) = s.dropout {
        within("--dropout", p, 0.0, 1.0, true)?;
    }
    positive("--max-norm", s.max_norm as f64)?;
    non_negative("--weight-decay", s.weight_decay as f64)?;
    if let Some(n) = s.max_eval_examples {
        at_least("--max-eval-examples", n as u64, 1)?;
    }
    if let Some(n) = s.stop_after {
        at_least("--stop-after", n, 1)?;
    }
    if let Some(n) = s.pal_dim {
        at_least("--pal-dim", n as u64, 1)?;
        if s.method != MethodName::Pals {
            bail!(
                "config error: --pal-dim {n}: only --method pals has a PAL size (this run: --method {})",
                s.method
            );
        }
    }
    Sampling::from_name(&s.sampling).map_err(|e| anyhow::anyhow!("config error: --sampling: {e}"))?;
    s.optimizer_settings().map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    check_custom_names(s.custom.iter().map(|c| c.name.as_str()))
        .map_err(|e| anyhow::anyhow!("config error: {e}"))?;
    // A run of custom tasks alone has no GLUE tasks; one of neither is refused by `task_flags`
    // (custom tasks are read from their folders after this check).
    let tasks = if s.tasks.is_empty() { Vec::new() } else { task_names(&s.tasks)? };
    Ok(TrainSettings { tasks, ..settings })
}

/// A setting's flag: `batch_size` → `--batch-size`.
fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// A setting's value as it is typed on the command line.
fn shown(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "(none)".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(shown).collect::<Vec<_>>().join(","),
        // f32 settings pass through f64 in JSON: show them as typed (0.0005, not 0.000500000023…).
        serde_json::Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap_or(f64::NAN) as f32),
        other => other.to_string(),
    }
}

/// The settings of a run resumed from the checkpoint `from` saved with `saved`, asked for
/// with `asked` (checked) where `given` names the settings set on the command line: the saved
/// ones, but [`RESUME_TAKES`] from the command line. A given flag that differs from the saved
/// run is refused, with every such flag named, rather than dropped.
pub fn resume_settings(
    saved: &TrainSettings,
    asked: &TrainSettings,
    given: &[String],
    from: &Path,
) -> Result<TrainSettings> {
    let saved_tasks = if saved.tasks.is_empty() { Vec::new() } else { task_names(&saved.tasks)? };
    let saved = TrainSettings { tasks: saved_tasks, ..saved.clone() };
    let saved_value = serde_json::to_value(&saved)?;
    let asked_value = serde_json::to_value(asked)?;
    let (Some(saved_fields), Some(asked_fields)) = (saved_value.as_object(), asked_value.as_object()) else {
        bail!("settings are not a JSON object");
    };
    let mut merged = saved_fields.clone();
    let mut refused = Vec::new();
    for (key, value) in asked_fields {
        let is_given = given.iter().any(|g| g == key);
        if RESUME_TAKES.contains(&key.as_str()) {
            // `--stop-after` counts steps of this run: a saved one is never reused.
            if is_given || key == "stop_after" {
                merged.insert(key.clone(), value.clone());
            }
            continue;
        }
        if key == "custom" {
            // Custom tasks may have moved: the folders given now are taken; names and kinds
            // must be the saved ones (their classes are checked against the data later).
            if is_given {
                match same_custom_tasks(&saved, asked) {
                    Ok(()) => {
                        merged.insert(key.clone(), value.clone());
                    }
                    Err(refusal) => refused.push(refusal),
                }
            }
            continue;
        }
        let saved = saved_fields.get(key).unwrap_or(&serde_json::Value::Null);
        if is_given && saved != value {
            refused.push(format!("{} {} (saved: {})", flag(key), shown(value), shown(saved)));
        }
    }
    if !refused.is_empty() {
        bail!(
            "config error: --resume continues {} with the settings it was saved with, and these flags \
             differ: {}. A resumed run takes only --stop-after and --max-eval-examples from the command \
             line; drop the others, or start a new run with --overwrite or another --output",
            from.display(),
            refused.join(", ")
        );
    }
    Ok(serde_json::from_value(serde_json::Value::Object(merged))?)
}

/// `--task` flags as typed: NAME=DIR:KIND, ...
fn custom_flags(settings: &TrainSettings) -> String {
    let flags: Vec<String> =
        settings.custom.iter().map(|t| format!("{}={}:{}", t.name, t.dir.display(), t.kind)).collect();
    if flags.is_empty() { "(none)".into() } else { flags.join(" ") }
}

/// Whether `asked` names the custom tasks of `saved`, in its order and of its kinds; the
/// refusal says which flags differ.
fn same_custom_tasks(saved: &TrainSettings, asked: &TrainSettings) -> std::result::Result<(), String> {
    let same = saved.custom.len() == asked.custom.len()
        && saved.custom.iter().zip(&asked.custom).all(|(s, a)| s.name == a.name && s.kind == a.kind);
    match same {
        true => Ok(()),
        false => Err(format!("--task {} (saved: {})", custom_flags(asked), custom_flags(saved))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::custom::{CustomTask, Kind};

    fn settings() -> TrainSettings {
        TrainSettings { tasks: vec!["rte".into(), "sst-2".into()], ..TrainSettings::default() }
    }

    #[test]
    fn every_number_out_of_range_is_refused_naming_its_flag() {
        let cases: Vec<(&str, TrainSettings)> = vec![
            ("--batch-size", TrainSettings { batch_size: 0, ..settings() }),
            ("--max-length", TrainSettings { max_length: 2, ..settings() }),
            ("--lr", TrainSettings { lr: -1e-5, ..settings() }),
            ("--lr", TrainSettings { lr: f32::NAN, ..settings() }),
            ("--epochs", TrainSettings { epochs: 0, ..settings() }),
            ("--steps-per-epoch", TrainSettings { steps_per_epoch: 0, ..settings() }),
            ("--steps-per-epoch", TrainSettings { epochs: 1 << 20, steps_per_epoch: 1 << 20, ..settings() }),
            ("--warmup", TrainSettings { warmup: 1.5, ..settings() }),
            ("--warmup", TrainSettings { warmup: -0.1, ..settings() }),
            ("--dropout", TrainSettings { dropout: Some(1.0), ..settings() }),
            ("--max-norm", TrainSettings { max_norm: 0.0, ..settings() }),
            ("--weight-decay", TrainSettings { weight_decay: f32::INFINITY, ..settings() }),
            ("--max-eval-examples", TrainSettings { max_eval_examples: Some(0), ..settings() }),
            ("--stop-after", TrainSettings { stop_after: Some(0), ..settings() }),
            ("--pal-dim", TrainSettings { pal_dim: Some(0), ..settings() }),
            ("--pal-dim", TrainSettings { pal_dim: Some(64), method: MethodName::LowRank, ..settings() }),
            ("--sampling", TrainSettings { sampling: "uniform".into(), ..settings() }),
            ("--optimizer", TrainSettings { optimizer: "sgd".into(), ..settings() }),
            ("--tasks", TrainSettings { tasks: vec!["rte".into(), "RTE".into()], ..settings() }),
            ("--tasks", TrainSettings { tasks: vec!["imdb".into()], ..settings() }),
        ];
        for (flag, bad) in cases {
            let error = checked(bad).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(error.starts_with("config error") && error.contains(flag), "{flag}: '{error}'");
        }
        let good =
            checked(TrainSettings { tasks: vec!["sts-b".into(), "Rte".into()], ..settings() }).unwrap();
        assert_eq!(good.tasks, ["STS-B", "RTE"]);
    }

    fn custom(name: &str, dir: &str, kind: Kind) -> CustomTask {
        CustomTask { name: name.into(), dir: dir.into(), kind, labels: vec!["a".into(), "b".into()] }
    }

    #[test]
    fn resume_takes_moved_custom_folders_but_refuses_other_custom_tasks() {
        let saved =
            TrainSettings { custom: vec![custom("mine", "/old", Kind::Classification)], ..settings() };
        let from = Path::new("runs/x/last");
        let given: Vec<String> = ["tasks", "custom"].map(String::from).into();
        let moved =
            TrainSettings { custom: vec![custom("mine", "/new", Kind::Classification)], ..settings() };
        let merged = resume_settings(&saved, &checked(moved).unwrap(), &given, from).unwrap();
        assert_eq!(merged.custom[0].dir, Path::new("/new"));
        // Without --task the saved folders are read.
        let merged = resume_settings(&saved, &checked(settings()).unwrap(), &given[..1], from).unwrap();
        assert_eq!(merged.custom, saved.custom);
        for other in [custom("yours", "/new", Kind::Classification), custom("mine", "/new", Kind::Regression)]
        {
            let asked = checked(TrainSettings { custom: vec![other], ..settings() }).unwrap();
            let error = resume_settings(&saved, &asked, &given, from).unwrap_err().to_string();
            assert!(error.contains("(saved: mine=/old:classification)"), "{error}");
        }
        // A custom task named as a GLUE task, or as another one, is refused; alone it needs no --tasks.
        for clash in
            [vec![custom("R-T-E", "/d", Kind::Regression)], vec![custom("x", "/d", Kind::Regression); 2]]
        {
            let error = checked(TrainSettings { custom: clash, ..settings() }).unwrap_err().to_string();
            assert!(error.starts_with("config error: --task"), "{error}");
        }
        let alone = TrainSettings {
            tasks: Vec::new(),
            custom: vec![custom("x", "/d", Kind::Regression)],
            ..settings()
        };
        assert!(checked(alone).unwrap().tasks.is_empty());
    }

    #[test]
    fn resume_keeps_the_saved_run_and_refuses_given_flags_that_differ() {
        let saved = TrainSettings { epochs: 3, lr: 1e-4, stop_after: Some(5), ..settings() };
        let from = Path::new("runs/x/last");
        // Defaults that differ are the saved run's; the case of task names does not count.
        let asked =
            checked(TrainSettings { tasks: vec!["RTE".into(), "SST2".into()], ..settings() }).unwrap();
        let given = vec!["tasks".to_string()];
        let merged = resume_settings(&saved, &asked, &given, from).unwrap();
        assert_eq!((merged.epochs, merged.lr, merged.stop_after), (3, 1e-4, None));
        let asked =
            TrainSettings { epochs: 5, lr: 2e-5, stop_after: Some(2), max_eval_examples: Some(9), ..asked };
        let takes: Vec<String> = ["tasks", "stop_after", "max_eval_examples"].map(String::from).into();
        let merged = resume_settings(&saved, &asked, &takes, from).unwrap();
        assert_eq!((merged.epochs, merged.stop_after, merged.max_eval_examples), (3, Some(2), Some(9)));
        let given: Vec<String> = ["tasks", "epochs", "lr"].map(String::from).into();
        let error = resume_settings(&saved, &asked, &given, from).unwrap_err().to_string();
        assert!(error.contains("--epochs 5 (saved: 3)") && error.contains("--lr"), "{error}");
        assert!(error.contains("runs/x/last") && error.contains("--overwrite"), "{error}");
    }
}
