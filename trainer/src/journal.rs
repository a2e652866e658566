//! The query journal: every answer the teacher gives a run is on disk (`queries.journal`,
//! fsynced) before the run uses it, with the queries and bytes it cost. A run killed at any
//! moment therefore loses no count, and its resumption, which recomputes the same requests from
//! the same seeds, takes the answers it already paid for from the journal instead of buying them
//! again.
//!
//! Layout: a 32-byte header (`MEKDQJ01`, then the usage of the records dropped by earlier
//! [`Journal::rotate`]s as three little-endian `u64`), then records: payload length (`u32`), the
//! payload (request hash, queries, bytes up, bytes down, `0` soft / `1` hard, value count, the
//! values), and an FNV-1a checksum of the payload (`u64`). A record cut short by a kill, or one
//! whose checksum fails, ends the journal: it is cut off when the journal is opened.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use mekd_runtime::protocol::TeacherInfo;

use crate::blackbox::{Responses, Teacher, TeacherError, Usage};

const MAGIC: &[u8; 8] = b"MEKDQJ01";
const HEADER_LEN: u64 = 32;

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

/// FNV-1a over `bytes` (stable across builds and platforms, unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
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
    /// Usage of the records dropped by rotations.
    base: Usage,
    /// Usage of the records in the file.
    recorded: Usage,
    /// Answers not replayed yet, by request hash, in the order they were bought.
    unreplayed: HashMap<u64, VecDeque<Responses>>,
}

fn add(a: Usage, b: Usage) -> Usage {
    Usage { queries: a.queries + b.queries, bytes_up: a.bytes_up + b.bytes_up, bytes_down: a.bytes_down + b.bytes_down }
}

impl Journal {
    /// Open the journal at `path`, or start one whose earlier usage is `base` (a run written
    /// before journals existed carries its count in `usage.json`). A torn last record is cut off.
    pub fn open(path: &Path, base: Usage) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        if !path.exists() {
            write_fresh(path, base).map_err(io)?;
        }
        let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
            return Err(JournalError::NotAJournal(path.to_path_buf()));
        }
        let field = |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
        let base = Usage { queries: field(0), bytes_up: field(1), bytes_down: field(2) };
        let mut journal = Self {
            path: path.to_path_buf(),
            file: file.try_clone().map_err(io)?,
            base,
            recorded: Usage::default(),
            unreplayed: HashMap::new(),
        };
        let mut at = HEADER_LEN as usize;
        while let Some(len) = bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        {
            let Some(payload) = bytes.get(at + 4..at + 4 + len) else { break };
            let Some(sum) = bytes.get(at + 4 + len..at + 12 + len) else { break };
            if u64::from_le_bytes(sum.try_into().expect("8 bytes")) != fnv1a(payload) {
                break;
            }
            let Some(record) = Record::parse(payload) else { break };
            journal.recorded = add(journal.recorded, record.cost);
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
        add(self.base, self.recorded)
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
        self.recorded = add(self.recorded, cost);
        Ok(())
    }

    /// Drop the stored answers, keeping their count (atomically: a new file whose header holds
    /// the total replaces this one). Call when no resumption can ask for them again: after a
    /// checkpoint that covers every request made so far.
    pub fn rotate(&mut self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let total = self.total();
        write_fresh(&self.path, total).map_err(io)?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(io)?;
        (self.base, self.recorded) = (total, Usage::default());
        self.unreplayed.clear();
        Ok(())
    }
}

/// Write an empty journal whose earlier usage is `base`, atomically (temporary file, fsync,
/// rename).
fn write_fresh(path: &Path, base: Usage) -> std::io::Result<()> {
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
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
        if let Some(answer) = lock(&self.journal).replay(images) {
            return Ok(answer);
        }
        let before = self.inner.usage();
        let answer = self.inner.query(images)?;
        let after = self.inner.usage();
        let cost = Usage {
            queries: after.queries - before.queries,
            bytes_up: after.bytes_up - before.bytes_up,
            bytes_down: after.bytes_down - before.bytes_down,
        };
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
        let mut journal = Journal::open(&path, usage(5, 50, 500)).unwrap();
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
        // Rotation keeps the count and drops the answers.
        journal.rotate().unwrap();
        journal.record(b"after", usage(1, 3, 9), &Responses::Hard(vec![2])).unwrap();
        drop(journal);
        let journal = Journal::open(&path, Usage::default()).unwrap();
        assert_eq!((journal.total(), journal.unreplayed()), (usage(12, 71, 687), 1));
        std::fs::write(&path, b"something else entirely, long enough").unwrap();
        assert!(matches!(Journal::open(&path, Usage::default()), Err(JournalError::NotAJournal(_))));
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
