//! The query journal: every answer the teacher gives a run is on disk (`queries.journal`,
//! fsynced) before the run uses it, with the queries and bytes it cost. A run killed at any
//! moment therefore loses no count, and its resumption, which recomputes the same requests from
//! the same seeds, takes the answers it already paid for from the journal instead of buying them
//! again.
//!
//! Every purchase also carries an idempotency key made of the run's id, the queries paid before
//! it and the request's hash: the same for the same request at the same point of the run, also
//! after a resumption. A request the teacher charged but whose answer never reached the journal
//! (killed in between) is therefore sent again under the same key, and a server that honours
//! keys (`mekd teacher serve`) answers it without charging twice: the run's count and the
//! server's stay equal.
//!
//! Layout: a 48-byte header (`MEKDQJ02`, the run's 128-bit id, then the usage of the records
//! dropped by earlier [`Journal::rotate`]s as three little-endian `u64`), then records: payload length (`u32`), the
//! payload (request hash, queries, bytes up, bytes down, `0` soft / `1` hard, value count, the
//! values), and an FNV-1a checksum of the payload (`u64`). A record cut short by a kill, or one
//! whose checksum fails, ends the journal: it is cut off when the journal is opened.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use mekd_contract::protocol::{TeacherInfo, fnv1a};
use mekd_runtime::rng::os_random_u64;

use mekd_contract::Usage;

use crate::blackbox::{Responses, Teacher, TeacherError};

const MAGIC: &[u8; 8] = b"MEKDQJ02";
const HEADER_LEN: usize = 48;
/// The first layout: no run id (its runs send no idempotency keys until the next rotation).
const MAGIC_V1: &[u8; 8] = b"MEKDQJ01";
const HEADER_LEN_V1: usize = 32;

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("query journal {path}: {source}")]
    Io {
        /// The journal.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not a query journal.
    #[error("{0} is not a query journal (bad header)")]
    NotAJournal(PathBuf),
}

/// One journaled teacher call.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    request: u64,
    cost: Usage,
    answer: Responses,
}

impl Record {
    fn payload(&self) -> Vec<u8> {
        let (kind, values): (u8, Vec<[u8; 4]>) = match &self.answer {
            Responses::Soft(logits) => (0, logits.iter().map(|v| v.to_le_bytes()).collect()),
            Responses::Hard(labels) => (1, labels.iter().map(|&v| (v as u32).to_le_bytes()).collect()),
        };
        let mut out = Vec::with_capacity(37 + 4 * values.len());
        for v in [self.request, self.cost.queries, self.cost.bytes_up, self.cost.bytes_down] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(kind);
        out.extend_from_slice(&(values.len() as u32).to_le_bytes());
        out.extend(values.into_iter().flatten());
        out
    }

    fn parse(payload: &[u8]) -> Option<Self> {
        let u64_at = |i: usize| Some(u64::from_le_bytes(payload.get(i..i + 8)?.try_into().ok()?));
        let kind = *payload.get(32)?;
        let count = u32::from_le_bytes(payload.get(33..37)?.try_into().ok()?) as usize;
        let values = payload.get(37..)?;
        if values.len() != count.checked_mul(4)? {
            return None;
        }
        let words = values.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
        let answer = match kind {
            0 => Responses::Soft(words.map(f32::from_le_bytes).collect()),
            1 => Responses::Hard(words.map(|w| u32::from_le_bytes(w) as usize).collect()),
            _ => return None,
        };
        let cost = Usage { queries: u64_at(8)?, bytes_up: u64_at(16)?, bytes_down: u64_at(24)? };
        Some(Self { request: u64_at(0)?, cost, answer })
    }
}

/// The journal file of one run: what was paid, and the answers a resumption may replay.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// The run's id (`None`: a journal of the first layout, not rotated since).
    run_id: Option<u128>,
    /// Usage of the records dropped by rotations.
    base: Usage,
    /// Usage of the records in the file.
    recorded: Usage,
    /// Answers not replayed yet, by request hash, in the order they were bought.
    unreplayed: HashMap<u64, VecDeque<Responses>>,
}

/// A fresh random run id.
fn new_run_id() -> u128 {
    ((os_random_u64() as u128) << 64) | os_random_u64() as u128
}

impl Journal {
    /// Open the journal at `path`, or start one whose earlier usage is `base` (a run written
    /// before journals existed carries its count in `usage.json`). A torn last record is cut off.
    pub fn open(path: &Path, base: Usage) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        if !path.exists() {
            write_fresh(path, new_run_id(), base).map_err(io)?;
        }
        let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (run_id, usage_at, header_len) = match bytes.get(..8) {
            Some(m) if m == MAGIC && bytes.len() >= HEADER_LEN => {
                (Some(u128::from_le_bytes(bytes[8..24].try_into().expect("16 bytes"))), 24, HEADER_LEN)
            }
            Some(m) if m == MAGIC_V1 && bytes.len() >= HEADER_LEN_V1 => (None, 8, HEADER_LEN_V1),
            _ => return Err(JournalError::NotAJournal(path.to_path_buf())),
        };
        let field =
            |i: usize| u64::from_le_bytes(bytes[usage_at + 8 * i..usage_at + 8 + 8 * i].try_into().expect("8 bytes"));
        let base = Usage { queries: field(0), bytes_up: field(1), bytes_down: field(2) };
        let mut journal = Self {
            path: path.to_path_buf(),
            file: file.try_clone().map_err(io)?,
            run_id,
            base,
            recorded: Usage::default(),
            unreplayed: HashMap::new(),
        };
        let mut at = header_len;
        while let Some(len) = bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        {
            let Some(payload) = bytes.get(at + 4..at + 4 + len) else { break };
            let Some(sum) = bytes.get(at + 4 + len..at + 12 + len) else { break };
            if u64::from_le_bytes(sum.try_into().expect("8 bytes")) != fnv1a(payload) {
                break;
            }
            let Some(record) = Record::parse(payload) else { break };
            journal.recorded = journal.recorded + record.cost;
            journal.unreplayed.entry(record.request).or_default().push_back(record.answer);
            at += 12 + len;
        }
        if at < bytes.len() {
            eprintln!("{}: cut off {} bytes of an interrupted write", path.display(), bytes.len() - at);
            file.set_len(at as u64).map_err(io)?;
        }
        journal.file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(journal)
    }

    /// Queries and bytes paid for by the run so far.
    pub fn total(&self) -> Usage {
        self.base + self.recorded
    }

    /// The idempotency key under which to buy the answer to `images` now: the run's id, the
    /// queries paid so far and the request's hash (`None` for a journal of the first layout).
    fn idempotency_key(&self, images: &[u8]) -> Option<String> {
        let run = self.run_id?;
        Some(format!("mekd-{run:032x}-{}-{:016x}", self.total().queries, fnv1a(images)))
    }

    /// Answers the journal holds and no request has taken back yet.
    pub fn unreplayed(&self) -> usize {
        self.unreplayed.values().map(VecDeque::len).sum()
    }

    /// The stored answer to `images`, if one was bought and not replayed yet.
    fn replay(&mut self, images: &[u8]) -> Option<Responses> {
        self.unreplayed.get_mut(&fnv1a(images)).and_then(VecDeque::pop_front)
    }

    /// Make the answer to `images` and its cost durable.
    fn record(&mut self, images: &[u8], cost: Usage, answer: &Responses) -> Result<(), JournalError> {
        let payload = Record { request: fnv1a(images), cost, answer: answer.clone() }.payload();
        let mut bytes = Vec::with_capacity(payload.len() + 12);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&fnv1a(&payload).to_le_bytes());
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        self.file.write_all(&bytes).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.recorded = self.recorded + cost;
        Ok(())
    }

    /// Drop the stored answers, keeping their count (atomically: a new file whose header holds
    /// the total replaces this one). Call when no resumption can ask for them again: after a
    /// checkpoint that covers every request made so far.
    pub fn rotate(&mut self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let total = self.total();
        let run_id = *self.run_id.get_or_insert_with(new_run_id);
        write_fresh(&self.path, run_id, total).map_err(io)?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(io)?;
        (self.base, self.recorded) = (total, Usage::default());
        self.unreplayed.clear();
        Ok(())
    }
}

/// Write an empty journal of run `run_id` whose earlier usage is `base`, atomically (temporary
/// file, fsync, rename).
fn write_fresh(path: &Path, run_id: u128, base: Usage) -> std::io::Result<()> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&run_id.to_le_bytes());
    for v in [base.queries, base.bytes_up, base.bytes_down] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    mekd_runtime::fsutil::write_atomic(path, &header)
}

/// A shared handle on a run's journal (the teacher writes it; the run rotates it at checkpoints).
pub type SharedJournal = Arc<Mutex<Journal>>;

/// Lock `journal` (a panic elsewhere leaves it usable: every write is whole or cut off on open).
pub fn lock(journal: &SharedJournal) -> std::sync::MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A teacher whose every answer goes through a [`Journal`]: replayed when the journal holds it,
/// else bought from `inner` and made durable before it is returned.
pub struct JournaledTeacher<'a> {
    inner: &'a mut dyn Teacher,
    journal: SharedJournal,
}

impl<'a> JournaledTeacher<'a> {
    /// Wrap `inner`, counting the journal's total as already used (so `inner`'s budget covers
    /// the whole run).
    pub fn new(inner: &'a mut dyn Teacher, journal: SharedJournal) -> Self {
        inner.add_prior_usage(lock(&journal).total());
        Self { inner, journal }
    }
}

impl Teacher for JournaledTeacher<'_> {
    fn info(&self) -> &TeacherInfo {
        self.inner.info()
    }

    fn query(&mut self, images: &[u8]) -> Result<Responses, TeacherError> {
        let key = {
            let mut journal = lock(&self.journal);
            if let Some(answer) = journal.replay(images) {
                return Ok(answer);
            }
            journal.idempotency_key(images)
        };
        let before = self.inner.usage();
        let answer = match &key {
            Some(key) => self.inner.query_keyed(images, key)?,
            None => self.inner.query(images)?,
        };
        let cost = self.inner.usage() - before;
        lock(&self.journal).record(images, cost, &answer).map_err(|e| TeacherError::Backend(e.into()))?;
        Ok(answer)
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }

    fn add_prior_usage(&mut self, prior: Usage) {
        self.inner.add_prior_usage(prior);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(queries: u64, bytes_up: u64, bytes_down: u64) -> Usage {
        Usage { queries, bytes_up, bytes_down }
    }

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queries.journal");
        let journal = Journal::open(&path, usage(5, 50, 500)).unwrap();
        // The key of a purchase is the same at the same point of the run, also after a reopening.
        let key = journal.idempotency_key(b"abc").unwrap();
        assert!(key.starts_with("mekd-") && key.ends_with(&format!("-5-{:016x}", fnv1a(b"abc"))), "{key}");
        drop(journal);
        let mut journal = Journal::open(&path, Usage::default()).unwrap();
        assert_eq!(journal.idempotency_key(b"abc").unwrap(), key);
        assert_ne!(journal.idempotency_key(b"abd").unwrap(), key);
        journal.record(b"abc", usage(2, 6, 80), &Responses::Soft(vec![0.5, -1.0])).unwrap();
        journal.record(b"xyz", usage(1, 3, 9), &Responses::Hard(vec![7])).unwrap();
        journal.record(b"abc", usage(2, 6, 80), &Responses::Soft(vec![2.0, 3.0])).unwrap();
        assert_eq!(journal.total(), usage(10, 65, 669));
        drop(journal);
        // A kill in the middle of a fourth record.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);
        let mut journal = Journal::open(&path, Usage::default()).unwrap();
        assert_eq!(journal.total(), usage(10, 65, 669), "the base comes from the file, the torn record is gone");
        assert_eq!(journal.unreplayed(), 3);
        // The same request twice: answered in the order bought; an unknown one is not.
        assert_eq!(journal.replay(b"abc"), Some(Responses::Soft(vec![0.5, -1.0])));
        assert_eq!(journal.replay(b"abc"), Some(Responses::Soft(vec![2.0, 3.0])));
        assert_eq!(journal.replay(b"abc"), None);
        assert_eq!(journal.replay(b"xyz"), Some(Responses::Hard(vec![7])));
        // Appending after the cut continues a valid file.
        journal.record(b"new", usage(1, 3, 9), &Responses::Hard(vec![1])).unwrap();
        drop(journal);
        let mut journal = Journal::open(&path, Usage::default()).unwrap();
        assert_eq!(journal.total(), usage(11, 68, 678));
        // Rotation keeps the count and the run's id, and drops the answers.
        let before = journal.idempotency_key(b"q").unwrap();
        journal.rotate().unwrap();
        assert_eq!(journal.idempotency_key(b"q").unwrap(), before);
        journal.record(b"after", usage(1, 3, 9), &Responses::Hard(vec![2])).unwrap();
        drop(journal);
        let journal = Journal::open(&path, Usage::default()).unwrap();
        assert_eq!((journal.total(), journal.unreplayed()), (usage(12, 71, 687), 1));
        // Another run has another id.
        let other = Journal::open(&dir.path().join("other.journal"), usage(5, 50, 500)).unwrap();
        assert_ne!(other.idempotency_key(b"abc").unwrap(), key);
        // A journal of the first layout (no run id) opens, keyless until its next rotation.
        let mut v1 = b"MEKDQJ01".to_vec();
        for v in [3u64, 30, 300] {
            v1.extend_from_slice(&v.to_le_bytes());
        }
        let old = dir.path().join("v1.journal");
        std::fs::write(&old, &v1).unwrap();
        let mut journal = Journal::open(&old, Usage::default()).unwrap();
        assert_eq!((journal.total(), journal.idempotency_key(b"abc")), (usage(3, 30, 300), None));
        journal.rotate().unwrap();
        assert!(journal.idempotency_key(b"abc").is_some());
        std::fs::write(&path, b"something else entirely, long enough to be a header of 48 bytes").unwrap();
        assert!(matches!(Journal::open(&path, Usage::default()), Err(JournalError::NotAJournal(_))));
    }
}
