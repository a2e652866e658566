//! API keys, per-key query budgets and their counts, persisted atomically so that they survive
//! a restart.

use std::collections::BTreeMap;
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
    used: Mutex<BTreeMap<String, u64>>,
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
        let used = if usage_file.exists() {
            let text = std::fs::read(usage_file).map_err(|e| file_error(usage_file, e.to_string()))?;
            serde_json::from_slice(&text).map_err(|e| file_error(usage_file, format!("not a usage file: {e}")))?
        } else {
            BTreeMap::new()
        };
        Ok(Self { keys, budget, usage_file: usage_file.to_path_buf(), used: Mutex::new(used) })
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
    /// Returns the queries left afterwards.
    pub fn reserve(&self, key: Option<&str>, n: u64) -> Result<Option<u64>, Refusal> {
        let key = self.known(key).ok_or(Refusal::Unauthorized)?;
        let mut used = self.used.lock().expect("accounts lock");
        let count = used.get(key).copied().unwrap_or(0);
        let budget = self.budget_of(key);
        if let Some(budget) = budget {
            let remaining = budget.saturating_sub(count);
            if n > remaining {
                return Err(Refusal::BudgetExhausted { remaining });
            }
        }
        used.insert(key.to_string(), count + n);
        // Persist before answering: a crash can never hand out queries that were not counted.
        if let Err(e) = self.persist(&used, false) {
            eprintln!("warning: cannot persist usage to {}: {e}", self.usage_file.display());
        }
        Ok(budget.map(|b| b.saturating_sub(count + n)))
    }

    /// Give back `n` queries reserved for a request that then failed on the server's side.
    pub fn refund(&self, key: &str, n: u64) {
        let mut used = self.used.lock().expect("accounts lock");
        if let Some(count) = used.get_mut(key) {
            *count = count.saturating_sub(n);
        }
        let _ = self.persist(&used, false);
    }

    /// `(used, budget, remaining)` of a valid key.
    pub fn usage(&self, key: Option<&str>) -> Result<(u64, Option<u64>, Option<u64>), Refusal> {
        let key = self.known(key).ok_or(Refusal::Unauthorized)?;
        let used = self.used.lock().expect("accounts lock").get(key).copied().unwrap_or(0);
        let budget = self.budget_of(key);
        Ok((used, budget, budget.map(|b| b.saturating_sub(used))))
    }

    /// Whether `key` is valid.
    pub fn is_valid(&self, key: Option<&str>) -> bool {
        self.known(key).is_some()
    }

    /// Write the counts durably (fsync), e.g. at shutdown.
    pub fn flush(&self) -> std::io::Result<()> {
        let used = self.used.lock().expect("accounts lock");
        self.persist(&used, true)
    }

    fn persist(&self, used: &BTreeMap<String, u64>, durable: bool) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(used).map_err(std::io::Error::other)?;
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
        assert_eq!(accounts.reserve(Some("alpha"), 4), Ok(Some(6)));
        assert_eq!(accounts.reserve(Some("alpha"), 7), Err(Refusal::BudgetExhausted { remaining: 6 }));
        assert_eq!(accounts.reserve(Some("gamma"), 1), Err(Refusal::Unauthorized));
        for near in ["alph", "alphaa", "Alpha", "", "alpha\0"] {
            assert_eq!(accounts.reserve(Some(near), 1), Err(Refusal::Unauthorized), "{near:?}");
        }
        assert!(accounts.is_valid(Some("beta")) && !accounts.is_valid(Some("bet")));
        assert_eq!(accounts.reserve(None, 1), Err(Refusal::Unauthorized));
        accounts.refund("alpha", 1);
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
        assert_eq!(accounts.reserve(Some("plain"), 5), Ok(Some(0)));
        assert_eq!(accounts.reserve(Some("small"), 3), Err(Refusal::BudgetExhausted { remaining: 2 }));
        assert_eq!(accounts.reserve(Some("free"), 1_000_000), Ok(None));
        for bad in ["key lots\n", "a b c\n"] {
            std::fs::write(&keys, bad).unwrap();
            let err = Accounts::open(&keys, None, &dir.path().join("usage.json")).err().unwrap().to_string();
            assert!(err.contains("line 1"), "{err}");
        }
    }
}
