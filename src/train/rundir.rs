//! The run directory (`pals train --output`): one writer at a time, and checkpoint swaps
//! that a crash interrupted are finished or rolled back before anything reads it.
//!
//! A checkpoint `NAME` (last, best, init) is written into `NAME.partial/`, whose files are
//! synced before the marker file `COMPLETE` is written last; then `NAME/` is renamed to
//! `NAME.old/`, `NAME.partial/` to `NAME/`, and `NAME.old/` removed. A crash at any point
//! leaves one of these, and [`recover`] resolves each the same way:
//! - a complete `NAME.partial/`: the newest checkpoint; the swap is finished.
//! - an incomplete `NAME.partial/`: never a checkpoint; removed.
//! - no `NAME/` but `NAME.old/`: rolled back (`NAME.old/` becomes `NAME/` again).
//! - `NAME/` and `NAME.old/`: the swap was done; `NAME.old/` is removed.
//!
//! The lock is `flock` on `pals.lock`: the kernel drops it when the process ends, however it
//! ends, so a crash never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The checkpoints a run directory can hold.
pub const CHECKPOINTS: [&str; 3] = ["last", "best", "init"];
/// Written last into a `.partial/` checkpoint: the files before it are complete and synced.
pub const COMPLETE: &str = "COMPLETE";
const LOCK_FILE: &str = "pals.lock";
/// What a run writes besides its checkpoints (removed by `--overwrite`).
const RUN_FILES: [&str; 2] = ["metrics.jsonl", "training.svg"];

/// `dir` with `.suffix` appended to its last component: `last` → `last.partial`.
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// The exclusive lock on a run directory, held until dropped (or the process ends).
pub struct RunLock {
    _file: File,
    /// The directory `lock` created, if it did: removed again when the lock is dropped
    /// holding nothing but the lock file (a command that failed before writing anything,
    /// e.g. on a wrong --model, leaves no empty run directory behind).
    created: Option<PathBuf>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(dir) = &self.created else { return };
        let only_lock = std::fs::read_dir(dir)
            .map(|mut entries| entries.all(|e| e.is_ok_and(|e| e.file_name() == LOCK_FILE)))
            .unwrap_or(false);
        if only_lock {
            // Still locked while it goes, so no other process can have started in it.
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Creates `dir` if needed and takes its lock; another live process holding it is an error
/// naming that process.
pub fn lock(dir: &Path) -> Result<RunLock> {
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("creating output directory {}", dir.display()))?;
    match try_lock(dir)? {
        Some(mut lock) => {
            lock.created = created.then(|| dir.to_path_buf());
            Ok(lock)
        }
        None => {
            let path = dir.join(LOCK_FILE);
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let by = if holder.is_empty() { String::new() } else { format!(" (process {holder})") };
            bail!(
                "output error: {} is in use by another pals process{by}: it holds {}; wait for it to end \
                 or choose another --output",
                dir.display(),
                path.display()
            )
        }
    }
}

/// The lock of an existing `dir`, or `None` when another process holds it.
fn try_lock(dir: &Path) -> Result<Option<RunLock>> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("locking {}", path.display()));
        }
    }
    // The holder's id, for the message another process prints; only informative.
    let _ = file.set_len(0).and_then(|_| write!(file, "{}", std::process::id()));
    Ok(Some(RunLock { _file: file, created: None }))
}

fn is_complete(partial: &Path) -> bool {
    partial.join(COMPLETE).is_file()
}

fn remove(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// Whether checkpoint `name` of `run` has leftovers of an interrupted swap.
fn interrupted(run: &Path, name: &str) -> bool {
    let dir = run.join(name);
    sibling(&dir, "partial").exists() || sibling(&dir, "old").exists()
}

/// Finishes or rolls back every interrupted checkpoint swap in `run` (see the module
/// comment); returns a line for each thing it did. The caller holds the lock.
pub fn recover(run: &Path) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    for name in CHECKPOINTS {
        let dir = run.join(name);
        let (partial, old) = (sibling(&dir, "partial"), sibling(&dir, "old"));
        if partial.exists() && is_complete(&partial) {
            if dir.exists() {
                if old.exists() {
                    remove(&old)?;
                }
                rename(&dir, &old)?;
            }
            rename(&partial, &dir)?;
            notes
                .push(format!("recovered {}: finished a checkpoint swap a crash interrupted", dir.display()));
        } else if partial.exists() {
            remove(&partial)?;
            notes.push(format!("removed {}: a checkpoint a crash left half-written", partial.display()));
        }
        if old.exists() && !dir.exists() {
            rename(&old, &dir)?;
            notes.push(format!("recovered {}: rolled back to the checkpoint before a crash", dir.display()));
        } else if old.exists() {
            remove(&old)?;
        }
    }
    Ok(notes)
}

/// Swaps the complete checkpoint `partial` in as `dir`, as the module comment describes.
pub fn swap_in(partial: &Path, dir: &Path) -> Result<()> {
    let old = sibling(dir, "old");
    if old.exists() {
        remove(&old)?;
    }
    if dir.exists() {
        rename(dir, &old)?;
    }
    rename(partial, dir)?;
    if old.exists() {
        remove(&old)?;
    }
    sync_dir(dir.parent().unwrap_or(Path::new(".")))
}

/// Makes renames in `dir` durable (a no-op where directories cannot be opened).
pub fn sync_dir(dir: &Path) -> Result<()> {
    if let Ok(handle) = File::open(dir) {
        // Some filesystems refuse fsync on a directory; the renames are still atomic there.
        let _ = handle.sync_all();
    }
    Ok(())
}

/// Whether `run` holds a run: a checkpoint or a metrics log.
pub fn holds_run(run: &Path) -> bool {
    CHECKPOINTS.iter().any(|name| run.join(name).exists()) || run.join(RUN_FILES[0]).exists()
}

/// Removes a run's checkpoints, leftovers and logs from `run` (`--overwrite`); other files
/// stay. The caller holds the lock.
pub fn clear(run: &Path) -> Result<()> {
    for name in CHECKPOINTS {
        let dir = run.join(name);
        for path in [sibling(&dir, "partial"), sibling(&dir, "old"), dir] {
            if path.exists() {
                remove(&path)?;
            }
        }
    }
    for file in RUN_FILES {
        let path = run.join(file);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The checkpoint directory `eval` and `predict` read for `path`: a run directory's `best/`
/// (else `last/`), the named checkpoint when `path` is `RUN/best`, `RUN/last` or `RUN/init`,
/// or `path` itself. An interrupted swap is recovered first when no trainer holds the run;
/// while one does, the complete checkpoint of the swap it is making is read instead.
pub fn checkpoint_to_read(path: &Path) -> Result<PathBuf> {
    let named = path.file_name().and_then(|n| n.to_str()).filter(|n| CHECKPOINTS.contains(n));
    let (run, names): (&Path, Vec<&str>) = match (named, path.parent()) {
        (Some(name), Some(parent)) => (parent, vec![name]),
        _ => (path, vec!["best", "last"]),
    };
    if CHECKPOINTS.iter().any(|name| interrupted(run, name))
        && let Some(_lock) = try_lock(run)?
    {
        for note in recover(run)? {
            eprintln!("{note}");
        }
    }
    for name in names {
        let dir = run.join(name);
        let partial = sibling(&dir, "partial");
        for candidate in [partial.clone(), dir.clone(), sibling(&dir, "old")] {
            let ready = candidate != partial || is_complete(&partial);
            if ready && candidate.join("shared.safetensors").exists() {
                return Ok(candidate);
            }
        }
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory the lock created and nothing else wrote to goes again with the lock;
    /// one that existed before, or that holds anything else, stays.
    #[test]
    fn a_run_directory_that_stayed_empty_is_removed_with_its_lock() {
        let base = std::env::temp_dir().join(format!("pals-rundir-empty-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let fresh = base.join("fresh");
        drop(lock(&fresh).unwrap());
        assert!(!fresh.exists(), "an unused new run directory is left behind");
        let used = base.join("used");
        let held = lock(&used).unwrap();
        std::fs::write(used.join("metrics.jsonl"), "{}").unwrap();
        drop(held);
        assert!(used.join("metrics.jsonl").exists());
        let existing = base.join("existing");
        std::fs::create_dir_all(&existing).unwrap();
        drop(lock(&existing).unwrap());
        assert!(existing.is_dir(), "a directory the user made is removed");
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn checkpoint(dir: &Path, step: &str, complete: bool) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("shared.safetensors"), step).unwrap();
        if complete {
            std::fs::write(dir.join(COMPLETE), "").unwrap();
        }
    }

    fn step_of(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("shared.safetensors")).unwrap()
    }

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pals-rundir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_swap_cut_between_its_renames_is_finished() {
        let run = temp("finish");
        checkpoint(&run.join("last.old"), "10", true);
        checkpoint(&run.join("last.partial"), "20", true);
        let notes = recover(&run).unwrap();
        assert_eq!(step_of(&run.join("last")), "20");
        assert!(!run.join("last.old").exists() && !run.join("last.partial").exists());
        assert_eq!(notes.len(), 1, "{notes:?}");
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn a_half_written_checkpoint_is_rolled_back() {
        let run = temp("rollback");
        checkpoint(&run.join("best.old"), "10", true);
        checkpoint(&run.join("best.partial"), "20", false);
        checkpoint(&run.join("last"), "30", true);
        checkpoint(&run.join("last.partial"), "40", false);
        recover(&run).unwrap();
        assert_eq!(step_of(&run.join("best")), "10");
        assert_eq!(step_of(&run.join("last")), "30");
        let left: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "only best/ and last/ remain: {left:?}");
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn a_second_lock_on_a_run_is_refused_and_freed_on_drop() {
        let run = temp("lock");
        let first = lock(&run).unwrap();
        let error = format!("{:#}", lock(&run).err().unwrap());
        assert!(error.contains("in use by another pals process") && error.contains("pals.lock"), "{error}");
        drop(first);
        lock(&run).unwrap();
        let _ = std::fs::remove_dir_all(&run);
    }
}
