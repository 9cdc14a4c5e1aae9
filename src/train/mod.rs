//! Training: the optimizer state on the GPU, and the bookkeeping on the host — official
//! GLUE metrics, the learning-rate schedule, the JSON-lines metrics log and its SVG plot.

pub mod checkpoint;
pub mod checks;
pub mod commands;
pub mod demo;
pub mod inference;
pub mod log;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod rundir;
pub mod schedule;
pub mod trainer;

pub use log::{EvalRecord, LogRecords, LogWriter, Record, StepRecord};
pub use metrics::{TaskScore, baseline, format_table, glue_average, score_classification, score_regression};
pub use plot::{render_svg, write_svg};
pub use schedule::{DEFAULT_WARMUP, lr};

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through `path.tmp` and a rename, so a reader (or a crash) never
/// sees half a file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}
