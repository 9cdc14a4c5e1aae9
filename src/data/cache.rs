//! A split tokenized once: read, checked, packed into `[CLS] A [SEP] (B [SEP])` ids, and kept
//! on disk so the next run skips the tokenizer.
//!
//! A cache file is named by the task, split, max length and a 64-bit FNV-1a key over everything
//! the result depends on: the tokenizer file's bytes and how the tokenizer behaves on a probe
//! text (this catches vocab.txt options such as lower-casing that are not in the file), the
//! max length, the task and split, the split file's bytes and, for a custom task, its file
//! format, kind and classes (which number its labels). Any change gives another file.
//! Files are written to a temporary name and renamed, so a reader never sees half of one; a
//! file that fails its checks (magic, key, checksum, lengths) is rebuilt, never an error.
//!
//! Format, little-endian: `PALSTOK1`, key u64, skipped u64, count u64; per example: index
//! u64, label tag u8 (0 none, 1 class, 2 score) and its u32 bits, length u32, ids u32 × length,
//! type ids u8 × length; then the FNV-1a of everything before it, u64.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Tokenizer;
use super::custom::CustomTask;
use super::glue::{self, DataError, Example, Label, Result, Split, SplitData, Task};

const MAGIC: &[u8; 8] = b"PALSTOK1";
/// Exercises lower-casing, accents, CJK, punctuation and special tokens.
const PROBE: &str = "Hello WORLD, naïve Café — 東京 [SEP] don't x1.5 UNAFFABLE";

/// One example as the encoder sees it (no padding).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub label: Option<Label>,
    /// Position of the example in the split ([`glue::SplitData::examples`]), which is also
    /// its position in [`TokenizedSplit::examples`].
    pub index: usize,
}

#[derive(Clone, Debug)]
pub struct TokenizedSplit {
    /// The task's name, for messages.
    pub task: String,
    pub split: Split,
    pub examples: Vec<TokenizedExample>,
    /// Malformed rows the reader skipped (QQP only).
    pub skipped: usize,
    /// Whether this came from the cache file.
    pub cached: bool,
}

impl TokenizedSplit {
    /// A split with no examples (a split not read).
    pub fn empty(task: &str, split: Split) -> TokenizedSplit {
        TokenizedSplit { task: task.to_string(), split, examples: Vec::new(), skipped: 0, cached: false }
    }

    /// Sequence lengths, what batching groups by.
    pub fn lengths(&self) -> Vec<usize> {
        self.examples.iter().map(|e| e.ids.len()).collect()
    }
}

/// `split` of `task` under `glue_dir`, tokenized to at most `max_len` tokens: from
/// `cache_dir` when a matching cache file is there, else tokenized and (with a `cache_dir`)
/// saved there. Without a `cache_dir` nothing is cached.
pub fn tokenized_split(
    tokenizer: &Tokenizer,
    glue_dir: &Path,
    task: Task,
    split: Split,
    max_len: usize,
    cache_dir: Option<&Path>,
) -> Result<TokenizedSplit> {
    let (path, bytes) = glue::read_split_bytes(glue_dir, task, split)?;
    let file = SplitFile { task: task.name(), identity: "", split, path: &path, bytes: &bytes };
    tokenized_file(tokenizer, &file, max_len, cache_dir, || glue::parse_split(&bytes, &path, task, split))
}

/// `split` of a custom task (its own folder), as [`tokenized_split`] does GLUE's.
pub fn tokenized_custom_split(
    tokenizer: &Tokenizer,
    task: &CustomTask,
    split: Split,
    max_len: usize,
    cache_dir: Option<&Path>,
) -> Result<TokenizedSplit> {
    let (path, bytes) = task.file(split)?;
    let identity = task.identity(&path);
    let file = SplitFile { task: &task.name, identity: &identity, split, path: &path, bytes: &bytes };
    tokenized_file(tokenizer, &file, max_len, cache_dir, || task.parse(&bytes, &path, split))
}

/// A split's file as read, and what else its examples depend on (a custom task's classes).
struct SplitFile<'a> {
    task: &'a str,
    identity: &'a str,
    split: Split,
    path: &'a Path,
    bytes: &'a [u8],
}

/// The cache file for `file` when there is a matching one, else `parse`d and tokenized (and
/// saved in `cache_dir`, if given).
fn tokenized_file(
    tokenizer: &Tokenizer,
    file: &SplitFile,
    max_len: usize,
    cache_dir: Option<&Path>,
    parse: impl FnOnce() -> Result<SplitData>,
) -> Result<TokenizedSplit> {
    let (task, split) = (file.task.to_string(), file.split);
    let cache_file = match cache_dir {
        Some(dir) => {
            let key = cache_key(tokenizer, file, max_len)?;
            let name = format!("{task}-{split}-len{max_len}-{key:016x}.tok");
            let cache_file = dir.join(name);
            if let Some((examples, skipped)) = std::fs::read(&cache_file).ok().and_then(|b| decode(&b, key)) {
                return Ok(TokenizedSplit { task, split, examples, skipped, cached: true });
            }
            Some((cache_file, key))
        }
        None => None,
    };
    let data = parse()?;
    let examples = tokenize_all(tokenizer, &data.examples, max_len, file.path)?;
    if let Some((cache_file, key)) = cache_file
        && let Err(error) = write_atomically(&cache_file, &encode(&examples, data.skipped, key))
    {
        warn_once(&error);
    }
    Ok(TokenizedSplit { task, split, examples, skipped: data.skipped, cached: false })
}

/// 64-bit FNV-1a; fields are length-prefixed so that their boundaries count.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.bytes(bytes);
    h.0
}

fn cache_key(tokenizer: &Tokenizer, file: &SplitFile, max_len: usize) -> Result<u64> {
    let source = &tokenizer.source;
    let vocab = std::fs::read(source).map_err(|e| DataError::Io { path: source.clone(), error: e })?;
    let probe = tokenizer.tokenize(PROBE).map_err(|e| {
        DataError::Invalid(format!("{}: cannot tokenize the probe text: {e}", source.display()))
    })?;
    let mut h = Fnv::new();
    h.field(MAGIC);
    h.field(&vocab);
    for id in probe.iter().chain(&[tokenizer.cls_id(), tokenizer.sep_id(), tokenizer.vocab_size() as u32]) {
        h.bytes(&id.to_le_bytes());
    }
    h.field(&(max_len as u64).to_le_bytes());
    h.field(file.task.as_bytes());
    h.field(file.identity.as_bytes());
    h.field(file.split.name().as_bytes());
    h.field(file.bytes);
    Ok(h.0)
}

/// Tokenizes on every core: the long splits (SST-2, QQP, MNLI) take seconds otherwise.
fn tokenize_all(
    tokenizer: &Tokenizer,
    examples: &[Example],
    max_len: usize,
    path: &Path,
) -> Result<Vec<TokenizedExample>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let chunk = examples.len().div_ceil(threads).max(1);
    let encode_one = |index: usize, e: &Example| {
        let encoded = tokenizer
            .encode_pair(&e.text_a, e.text_b.as_deref(), max_len)
            .map_err(|error| DataError::Tokenize { path: path.to_path_buf(), line: e.line, error })?;
        Ok(TokenizedExample { ids: encoded.ids, type_ids: encoded.type_ids, label: e.label, index })
    };
    let parts: Vec<Result<Vec<TokenizedExample>>> = std::thread::scope(|s| {
        let handles: Vec<_> = examples
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || part.iter().enumerate().map(|(i, e)| encode_one(c * chunk + i, e)).collect())
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("tokenizer thread panicked")).collect()
    });
    let mut all = Vec::with_capacity(examples.len());
    for part in parts {
        all.extend(part?);
    }
    Ok(all)
}

fn encode(examples: &[TokenizedExample], skipped: usize, key: u64) -> Vec<u8> {
    let tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
    let mut out = Vec::with_capacity(32 + examples.len() * 17 + tokens * 5 + 8);
    out.extend_from_slice(MAGIC);
    for v in [key, skipped as u64, examples.len() as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for e in examples {
        out.extend_from_slice(&(e.index as u64).to_le_bytes());
        let (tag, bits) = match e.label {
            None => (0u8, 0u32),
            Some(Label::Class(c)) => (1, c),
            Some(Label::Score(s)) => (2, s.to_bits()),
        };
        out.push(tag);
        out.extend_from_slice(&bits.to_le_bytes());
        out.extend_from_slice(&(e.ids.len() as u32).to_le_bytes());
        for id in &e.ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend(e.type_ids.iter().map(|&t| t as u8));
    }
    let sum = fnv1a64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Reads little-endian fields; None past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

/// The examples and skipped count of a cache file, or None unless it is whole and for `key`.
fn decode(bytes: &[u8], key: u64) -> Option<(Vec<TokenizedExample>, usize)> {
    let body = bytes.get(..bytes.len().checked_sub(8)?)?;
    let sum = u64::from_le_bytes(bytes[body.len()..].try_into().ok()?);
    if sum != fnv1a64(body) {
        return None;
    }
    let mut r = Reader(body);
    if r.take(8)? != MAGIC || r.u64()? != key {
        return None;
    }
    let skipped = r.u64()? as usize;
    let count = r.u64()? as usize;
    let mut examples = Vec::with_capacity(count.min(body.len() / 17));
    for _ in 0..count {
        let index = r.u64()? as usize;
        let (tag, bits) = (r.u8()?, r.u32()?);
        let label = match tag {
            0 => None,
            1 => Some(Label::Class(bits)),
            2 => Some(Label::Score(f32::from_bits(bits))),
            _ => return None,
        };
        let len = r.u32()? as usize;
        let ids =
            r.take(len.checked_mul(4)?)?.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let ids = ids.collect();
        let type_ids = r.take(len)?.iter().map(|&t| t as u32).collect();
        examples.push(TokenizedExample { ids, type_ids, label, index });
    }
    r.0.is_empty().then_some((examples, skipped))
}

/// Writes `file` whole or not at all: a temporary file in the same directory, then a rename.
/// The cache only saves time: a directory that cannot be written is a warning (once per
/// process) and the run goes on without it.
fn warn_once(error: &DataError) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("warning: tokenization cache not written ({error}); continuing without it");
    }
}

fn write_atomically(file: &Path, bytes: &[u8]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| DataError::Io { path, error }
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per process and call: concurrent writers never share a temporary file.
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let temp: PathBuf = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
    std::fs::write(&temp, bytes).map_err(io(&temp))?;
    std::fs::rename(&temp, file).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(file)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn encode_decode_round_trips_and_rejects_damage() {
        let examples = vec![
            TokenizedExample { ids: vec![2, 7, 3], type_ids: vec![0, 0, 0], label: None, index: 0 },
            TokenizedExample {
                ids: vec![2, 70000, 3, 9, 3],
                type_ids: vec![0, 0, 0, 1, 1],
                label: Some(Label::Class(2)),
                index: 1,
            },
            TokenizedExample {
                ids: vec![2, 3],
                type_ids: vec![0, 0],
                label: Some(Label::Score(3.25)),
                index: 2,
            },
        ];
        let bytes = encode(&examples, 4, 99);
        assert_eq!(decode(&bytes, 99), Some((examples, 4)));
        assert_eq!(decode(&bytes, 98), None, "another key");
        assert_eq!(decode(&bytes[..bytes.len() - 1], 99), None, "truncated");
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert_eq!(decode(&flipped, 99), None, "a flipped bit");
        assert_eq!(decode(b"", 99), None);
    }
}
