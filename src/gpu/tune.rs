//! Choices measured once per adapter and driver (e.g. matmul tiles), kept in memory and in
//! a small JSON file under the user's cache directory so the next run starts fast.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Choices measured on one adapter, keyed by shape class.
pub struct TuneCache {
    path: Option<PathBuf>,
    choices: Mutex<BTreeMap<String, String>>,
    /// Time spent measuring in this process, for reports.
    pub spent: Mutex<Duration>,
    /// Off: `choose` takes the first candidate (the kernel's default) unmeasured and does not
    /// remember it, for runs too short to repay measuring (`pals demo`).
    pub measure: AtomicBool,
}

/// `PALS_CACHE_DIR`, else `$XDG_CACHE_HOME/pals`, else `~/.cache/pals`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PALS_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("pals"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("pals"))
}

/// Whether measuring is allowed: `PALS_TUNE=off` uses each kernel's default instead.
pub fn tuning_enabled() -> bool {
    !matches!(std::env::var("PALS_TUNE").as_deref(), Ok("off" | "0" | "false"))
}

impl TuneCache {
    /// The cache for one adapter; `identity` names adapter, backend and driver version.
    pub fn open(identity: &str) -> TuneCache {
        let file: String =
            identity.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let path = cache_dir().map(|dir| dir.join(format!("tune-{file}.json")));
        TuneCache::load(path)
    }

    /// A cache kept in the given file.
    pub fn at(path: PathBuf) -> TuneCache {
        TuneCache::load(Some(path))
    }

    fn load(path: Option<PathBuf>) -> TuneCache {
        let choices = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            // A damaged cache file is only a lost measurement: start afresh.
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        TuneCache {
            path,
            choices: Mutex::new(choices),
            spent: Mutex::new(Duration::ZERO),
            measure: AtomicBool::new(true),
        }
    }

    /// The choice remembered for `key`; none while measuring is off, so that such a run
    /// takes every kernel's default whatever an earlier run measured: the kernels it
    /// compiles up front (`pals demo`'s warm-up) are then the ones it runs, at any shape.
    pub fn get(&self, key: &str) -> Option<String> {
        if !self.measure.load(Ordering::Relaxed) {
            return None;
        }
        self.choices.lock().unwrap().get(key).cloned()
    }

    /// Measures each candidate with `seconds` (smaller is better), remembers the fastest.
    pub fn choose(&self, key: &str, candidates: &[String], mut seconds: impl FnMut(&str) -> f64) -> String {
        if let Some(found) = self.get(key)
            && candidates.contains(&found)
        {
            return found;
        }
        if !self.measure.load(Ordering::Relaxed) {
            return candidates[0].clone();
        }
        let started = Instant::now();
        let mut best = (f64::INFINITY, candidates[0].clone());
        for candidate in candidates {
            let time = seconds(candidate);
            if time < best.0 {
                best = (time, candidate.clone());
            }
        }
        let spent = started.elapsed();
        *self.spent.lock().unwrap() += spent;
        // First runs pause here (pipelines compile, candidates run): say what is going on.
        eprintln!(
            "tuned {key}: {} of {} candidates ({:.1} ms) in {:.2} s",
            best.1,
            candidates.len(),
            best.0 * 1e3,
            spent.as_secs_f64()
        );
        self.choices.lock().unwrap().insert(key.to_string(), best.1.clone());
        self.save();
        best.1
    }

    /// Write to a temporary file, then rename: a crash never leaves half a file.
    fn save(&self) {
        let Some(path) = &self.path else { return };
        let text = serde_json::to_string_pretty(&*self.choices.lock().unwrap()).unwrap_or_default();
        let temporary = path.with_extension(format!("json.tmp{}", std::process::id()));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(&temporary, text))
            .and_then(|_| std::fs::rename(&temporary, path));
        // The cache only saves time; failing to write it must not stop a run.
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
    }
}
