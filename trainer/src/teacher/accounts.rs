//! API keys, per-key query budgets and their counts, persisted atomically so that they survive
//! a restart; with each count, the idempotency keys of the key's latest charged requests, so that
//! a request sent again (a client's retry, a killed client's resumption, a retry across a server
//! restart) is answered without being charged twice.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mekd_runtime::fsutil::write_atomic;

/// Why a request is not served.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or unknown key.
    Unauthorized,
    /// Not enough budget left for the request.
    BudgetExhausted {
        /// Queries left.
        remaining: u64,
    },
    /// The idempotency key was used before for a different request body.
    IdempotencyMismatch,
}

/// How many charged idempotency keys each API key remembers (the oldest is forgotten first). A
/// request is sent again within moments (a retry) or after a restart of one side, so only the
/// latest few of each client matter; the bound keeps the usage file small.
pub const IDEMPOTENCY_WINDOW: usize = 256;

/// A request's idempotency key and a hash of its body.
#[derive(Clone, Copy, Debug)]
pub struct Idempotency<'a> {
    /// The client's `Idempotency-Key`.
    pub key: &'a str,
    /// A hash of the request body (a repeated key must come with the same body).
    pub body_hash: u64,
}

/// A charged request the server remembers: hashes of its idempotency key and its body, and the
/// queries charged (written as a 3-number array: the usage file is rewritten on every charge).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Charged(u64, u64, u64);

impl Charged {
    fn of(asked: Idempotency, queries: u64) -> Self {
        Charged(Self::key_hash(asked.key), asked.body_hash, queries)
    }

    /// How an idempotency key is remembered.
    fn key_hash(key: &str) -> u64 {
        mekd_contract::protocol::fnv1a(key.as_bytes())
    }
}

/// What `reserve` granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Queries left afterwards (`None`: unlimited).
    pub remaining: Option<u64>,
    /// The request was charged before under the same idempotency key: answer it, free.
    pub replayed: bool,
}

/// The usage file: counts per key and each key's latest charged idempotency keys. (A file of
/// counts alone, `{"KEY": N}`, is read too: it is what servers before idempotency wrote.)
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Ledger {
    used: BTreeMap<String, u64>,
    #[serde(default)]
    charged: BTreeMap<String, VecDeque<Charged>>,
}

impl Ledger {
    fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
            .or_else(|_| serde_json::from_slice(bytes).map(|used| Ledger { used, charged: BTreeMap::new() }))
    }
}

/// Problems with the keys or usage files.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// A file cannot be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A key's own budget, from the keys file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyBudget {
    /// The server's `--budget`.
    Default,
    /// This many queries.
    Limit(u64),
    /// No limit.
    Unlimited,
}

/// The keys, the budget and the counts.
pub struct Accounts {
    keys: BTreeMap<String, KeyBudget>,
    budget: Option<u64>,
    usage_file: PathBuf,
    ledger: Mutex<Ledger>,
}

impl Accounts {
    /// Read the keys file (one key per line, optionally followed by that key's own budget: a
    /// number or `unlimited`; blank lines and `#` comments ignored) and the counts persisted in
    /// `usage_file` (absent: all zero). Keys without their own budget get `budget`.
    pub fn open(keys_file: &Path, budget: Option<u64>, usage_file: &Path) -> Result<Self, AccountsError> {
        let file_error = |path: &Path, reason: String| AccountsError::File { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(keys_file).map_err(|e| file_error(keys_file, e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(keys_file).map(|m| m.permissions().mode()).unwrap_or(0);
            if mode & 0o077 != 0 {
                eprintln!(
                    "warning: the keys file {} can be read by other users (mode {:o}); `chmod 600` it",
                    keys_file.display(),
                    mode & 0o777
                );
            }
        }
        let mut keys = BTreeMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let own = match fields.as_slice() {
                [_] => KeyBudget::Default,
                [_, "unlimited"] => KeyBudget::Unlimited,
                [_, n] => KeyBudget::Limit(n.parse().map_err(|_| {
                    file_error(
                        keys_file,
                        format!("line {}: `{n}` is not a budget (a number or `unlimited`)", number + 1),
                    )
                })?),
                _ => {
                    return Err(file_error(
                        keys_file,
                        format!("line {}: expected `KEY` or `KEY BUDGET` (keys cannot contain spaces)", number + 1),
                    ));
                }
            };
            if fields[0].chars().any(|c| c.is_control()) {
                return Err(file_error(keys_file, format!("line {}: the key contains control characters", number + 1)));
            }
            keys.insert(fields[0].to_string(), own);
        }
        if keys.is_empty() {
            return Err(file_error(keys_file, "holds no API key (one per line)".into()));
        }
        let ledger = if usage_file.exists() {
            let text = std::fs::read(usage_file).map_err(|e| file_error(usage_file, e.to_string()))?;
            Ledger::parse(&text).map_err(|e| file_error(usage_file, format!("not a usage file: {e}")))?
        } else {
            Ledger::default()
        };
        Ok(Self { keys, budget, usage_file: usage_file.to_path_buf(), ledger: Mutex::new(ledger) })
    }

    /// The budget of a known key.
    fn budget_of(&self, key: &str) -> Option<u64> {
        match self.keys.get(key) {
            Some(KeyBudget::Limit(n)) => Some(*n),
            Some(KeyBudget::Unlimited) => None,
            Some(KeyBudget::Default) | None => self.budget,
        }
    }

    /// The known key equal to `given`, compared in constant time: every known key is compared
    /// byte by byte to the end, so the time taken does not tell an attacker how many leading
    /// bytes of a guess were right (only the keys' lengths, which are not secret, shape it).
    fn known(&self, given: Option<&str>) -> Option<&str> {
        let given = given?.as_bytes();
        let mut found = None;
        for key in self.keys.keys() {
            let known = key.as_bytes();
            let mut diff = (known.len() != given.len()) as u8;
            for (i, byte) in known.iter().enumerate() {
                diff |= byte ^ given.get(i).copied().unwrap_or(0);
            }
            if std::hint::black_box(diff) == 0 {
                found = Some(key.as_str());
            }
        }
        found
    }

    /// Check `key` and, if `n` queries fit in its budget, count them (persisting the new count).
    /// With an `idempotency` key that this API key was charged for before (same body), nothing is
    /// counted and the grant says `replayed`; a new one is remembered with the count, in the same
    /// write.
    pub fn reserve(&self, key: Option<&str>, n: u64, idempotency: Option<Idempotency>) -> Result<Grant, Refusal> {
        let key = self.known(key).ok_or(Refusal::Unauthorized)?;
        let mut ledger = self.lock();
        let count = ledger.used.get(key).copied().unwrap_or(0);
        let budget = self.budget_of(key);
        let asked = idempotency.map(|asked| Charged::of(asked, n));
        if let Some(asked) = &asked
            && let Some(before) = ledger.charged.get(key).and_then(|c| c.iter().find(|c| c.0 == asked.0))
        {
            if before != asked {
                return Err(Refusal::IdempotencyMismatch);
            }
            return Ok(Grant { remaining: budget.map(|b| b.saturating_sub(count)), replayed: true });
        }
        if let Some(budget) = budget {
            let remaining = budget.saturating_sub(count);
            if n > remaining {
                return Err(Refusal::BudgetExhausted { remaining });
            }
        }
        ledger.used.insert(key.to_string(), count + n);
        if let Some(asked) = asked {
            let charged = ledger.charged.entry(key.to_string()).or_default();
            if charged.len() == IDEMPOTENCY_WINDOW {
                charged.pop_front();
            }
            charged.push_back(asked);
        }
        // Persist before answering: a crash can never hand out queries that were not counted.
        if let Err(e) = self.persist(&ledger, false) {
            eprintln!("warning: cannot persist usage to {}: {e}", self.usage_file.display());
        }
        Ok(Grant { remaining: budget.map(|b| b.saturating_sub(count + n)), replayed: false })
    }

    /// Give back `n` queries reserved for a request that then failed on the server's side (and
    /// forget its idempotency key: the request was not answered).
    pub fn refund(&self, key: &str, n: u64, idempotency: Option<&str>) {
        let mut ledger = self.lock();
        if let Some(count) = ledger.used.get_mut(key) {
            *count = count.saturating_sub(n);
        }
        if let (Some(asked), Some(charged)) = (idempotency, ledger.charged.get_mut(key)) {
            let asked = Charged::key_hash(asked);
            charged.retain(|c| c.0 != asked);
        }
        let _ = self.persist(&ledger, false);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `(used, budget, remaining)` of a valid key.
    pub fn usage(&self, key: Option<&str>) -> Result<(u64, Option<u64>, Option<u64>), Refusal> {
        let key = self.known(key).ok_or(Refusal::Unauthorized)?;
        let used = self.lock().used.get(key).copied().unwrap_or(0);
        let budget = self.budget_of(key);
        Ok((used, budget, budget.map(|b| b.saturating_sub(used))))
    }

    /// Whether `key` is valid.
    pub fn is_valid(&self, key: Option<&str>) -> bool {
        self.known(key).is_some()
    }

    /// Write the counts durably (fsync), e.g. at shutdown.
    pub fn flush(&self) -> std::io::Result<()> {
        let ledger = self.lock();
        self.persist(&ledger, true)
    }

    fn persist(&self, ledger: &Ledger, durable: bool) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(ledger).map_err(std::io::Error::other)?;
        if durable {
            write_atomic(&self.usage_file, &bytes)
        } else {
            mekd_runtime::fsutil::replace(&self.usage_file, &bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_enforced_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# team keys\nalpha\n\nbeta\n").unwrap();
        let usage = dir.path().join("usage.json");
        let accounts = Accounts::open(&keys, Some(10), &usage).unwrap();
        assert_eq!(accounts.reserve(Some("alpha"), 4, None).map(|g| g.remaining), Ok(Some(6)));
        assert_eq!(accounts.reserve(Some("alpha"), 7, None), Err(Refusal::BudgetExhausted { remaining: 6 }));
        assert_eq!(accounts.reserve(Some("gamma"), 1, None), Err(Refusal::Unauthorized));
        for near in ["alph", "alphaa", "Alpha", "", "alpha\0"] {
            assert_eq!(accounts.reserve(Some(near), 1, None), Err(Refusal::Unauthorized), "{near:?}");
        }
        assert!(accounts.is_valid(Some("beta")) && !accounts.is_valid(Some("bet")));
        assert_eq!(accounts.reserve(None, 1, None), Err(Refusal::Unauthorized));
        accounts.refund("alpha", 1, None);
        assert_eq!(accounts.usage(Some("alpha")), Ok((3, Some(10), Some(7))));
        let reopened = Accounts::open(&keys, Some(10), &usage).unwrap();
        assert_eq!(reopened.usage(Some("alpha")), Ok((3, Some(10), Some(7))));
        assert_eq!(reopened.usage(Some("beta")), Ok((0, Some(10), Some(10))));
        std::fs::write(&keys, "\n# none\n").unwrap();
        assert!(Accounts::open(&keys, None, &usage).err().unwrap().to_string().contains("holds no API key"));
    }

    #[test]
    fn keys_may_carry_their_own_budget() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "plain\nsmall 2\nfree unlimited\n").unwrap();
        let accounts = Accounts::open(&keys, Some(5), &dir.path().join("usage.json")).unwrap();
        assert_eq!(accounts.reserve(Some("plain"), 5, None).map(|g| g.remaining), Ok(Some(0)));
        assert_eq!(accounts.reserve(Some("small"), 3, None), Err(Refusal::BudgetExhausted { remaining: 2 }));
        assert_eq!(accounts.reserve(Some("free"), 1_000_000, None).map(|g| g.remaining), Ok(None));
        for bad in ["key lots\n", "a b c\n"] {
            std::fs::write(&keys, bad).unwrap();
            let err = Accounts::open(&keys, None, &dir.path().join("usage.json")).err().unwrap().to_string();
            assert!(err.contains("line 1"), "{err}");
        }
    }

    #[test]
    fn a_repeated_idempotency_key_is_answered_free_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "alpha\nbeta\n").unwrap();
        let usage = dir.path().join("usage.json");
        let accounts = Accounts::open(&keys, Some(10), &usage).unwrap();
        let first = Idempotency { key: "run-1-0", body_hash: 7 };
        assert_eq!(accounts.reserve(Some("alpha"), 4, Some(first)), Ok(Grant { remaining: Some(6), replayed: false }));
        assert_eq!(accounts.reserve(Some("alpha"), 4, Some(first)), Ok(Grant { remaining: Some(6), replayed: true }));
        // The same key with another body, or for another API key, is not the same request.
        let other_body = Idempotency { key: "run-1-0", body_hash: 8 };
        assert_eq!(accounts.reserve(Some("alpha"), 4, Some(other_body)), Err(Refusal::IdempotencyMismatch));
        assert_eq!(accounts.reserve(Some("beta"), 4, Some(first)).map(|g| g.replayed), Ok(false));
        // Remembered across a restart, with the count.
        drop(accounts);
        let accounts = Accounts::open(&keys, Some(10), &usage).unwrap();
        assert_eq!(accounts.reserve(Some("alpha"), 4, Some(first)), Ok(Grant { remaining: Some(6), replayed: true }));
        assert_eq!(accounts.usage(Some("alpha")), Ok((4, Some(10), Some(6))));
        // A refunded request is forgotten: sending it again charges it.
        let second = Idempotency { key: "run-1-4", body_hash: 9 };
        assert!(!accounts.reserve(Some("alpha"), 2, Some(second)).unwrap().replayed);
        accounts.refund("alpha", 2, Some("run-1-4"));
        assert_eq!(accounts.reserve(Some("alpha"), 2, Some(second)), Ok(Grant { remaining: Some(4), replayed: false }));
        // Only the latest IDEMPOTENCY_WINDOW keys are remembered.
        let unlimited = Accounts::open(&keys, None, &dir.path().join("other.json")).unwrap();
        let names: Vec<String> = (0..=IDEMPOTENCY_WINDOW).map(|i| format!("k{i}")).collect();
        for name in &names {
            unlimited.reserve(Some("alpha"), 1, Some(Idempotency { key: name, body_hash: 0 })).unwrap();
        }
        let again = |name: &str| unlimited.reserve(Some("alpha"), 1, Some(Idempotency { key: name, body_hash: 0 }));
        assert!(again(names.last().unwrap()).unwrap().replayed);
        assert!(!again("k0").unwrap().replayed, "the oldest key was forgotten");
        // A usage file of counts alone (written before idempotency) still opens.
        std::fs::write(&usage, r#"{"alpha": 3}"#).unwrap();
        assert_eq!(Accounts::open(&keys, Some(10), &usage).unwrap().usage(Some("alpha")), Ok((3, Some(10), Some(7))));
    }
}
