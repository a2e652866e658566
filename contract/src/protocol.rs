//! The teacher's HTTP wire protocol, shared by the server (`mekd teacher serve`), the trainer's
//! client and `mekd-edge bench`.
//!
//! - `GET /v1/health` (no key): `{"status":"ok"}`.
//! - `GET /v1/info` (key): [`TeacherInfo`].
//! - `GET /v1/usage` (key): [`KeyUsage`].
//! - `POST /v1/query` (key): body = `N` images of the model's input shape, `u8`, CHW, back to
//!   back (`N * C * H * W` bytes, `Content-Type: application/octet-stream`); answer
//!   [`QueryResponse`]. `N` counts against the key's budget.
//!
//! The key travels as `Authorization: Bearer KEY` (or `X-Api-Key: KEY`). Errors are JSON
//! [`ErrorBody`] with status 400 (malformed), 401 (missing or wrong key), 404, 405, 413 (batch or
//! body too large), 422 (an idempotency key reused for another body), 429 (budget exhausted;
//! `remaining` says how many queries are left), 500.
//!
//! A query may carry `Idempotency-Key: K` (1 to [`MAX_IDEMPOTENCY_KEY_LEN`] visible ASCII
//! characters, unique per request of an API key): the server charges `K` once and answers a
//! repeat of it (same body) without charging, with `Idempotent-Replayed: true`, also after its
//! own restart. So a client may send a request again when it cannot know whether the first one
//! arrived (a broken connection, a timeout, its own restart) without paying twice.
//!
//! The server also speaks the Open Inference Protocol ([`v2`]) with the same keys, budgets and
//! idempotency keys.

use serde::{Deserialize, Serialize};

pub mod v2;

/// Path of the health endpoint.
pub const HEALTH: &str = "/v1/health";
/// Path of the info endpoint.
pub const INFO: &str = "/v1/info";
/// Path of the usage endpoint.
pub const USAGE: &str = "/v1/usage";
/// Path of the query endpoint.
pub const QUERY: &str = "/v1/query";
/// Header naming a query's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header set (to `true`) on the answer to a repeated idempotency key, which was not charged.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Longest idempotency key the server takes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Whether `key` is a valid idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] visible ASCII
/// characters.
pub fn valid_idempotency_key(key: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// FNV-1a, 64 bits, over `bytes`: the stable hash of request bodies (the server's check that a
/// repeated idempotency key comes with the same body; the trainer's query journal). Stable
/// across builds and platforms, unlike std's hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Environment variable clients read the API key from when no `--api-key` is given.
pub const API_KEY_ENV: &str = "MEKD_API_KEY";

/// What the server answers per image: fixed by the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ResponseMode {
    /// Class scores (the model's raw logits).
    Soft,
    /// Only the top-1 class.
    Hard,
}

impl std::fmt::Display for ResponseMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResponseMode::Soft => "soft",
            ResponseMode::Hard => "hard",
        })
    }
}

/// `GET /v1/info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    /// `[C, H, W]` of one image; clients send exactly this shape.
    pub input_shape: [usize; 3],
    /// Number of classes.
    pub num_classes: usize,
    /// Class names, when the model has them.
    pub class_names: Option<Vec<String>>,
    /// Response mode of this server.
    pub response: ResponseMode,
    /// Per-channel mean applied by the server to pixels in [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel std applied by the server to pixels in [0, 1].
    pub std: Vec<f32>,
    /// Most images per request.
    pub max_batch: usize,
}

/// `POST /v1/query` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueryResponse {
    /// Images answered.
    pub count: usize,
    /// Soft mode: `count * num_classes` logits, row by row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
    /// Hard mode: the top-1 class per image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<usize>>,
    /// Queries left for this key (`None`: unlimited).
    pub remaining: Option<u64>,
}

impl QueryResponse {
    /// Bytes of this answer's body on the wire (compact JSON, as the server writes it). The one
    /// rule for `bytes_down` of every teacher kind: a local teacher counts the body the HTTP API
    /// would have carried for the same answer to an unlimited key.
    pub fn wire_len(&self) -> u64 {
        struct Count(u64);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        serde_json::to_writer(&mut count, self).expect("an answer always serialises");
        count.0
    }
}

/// `GET /v1/usage` answer: the server's account of one API key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// Queries (images) answered for this key so far.
    pub used: u64,
    /// The key's budget (`None`: unlimited).
    pub budget: Option<u64>,
    /// Queries left (`None`: unlimited).
    pub remaining: Option<u64>,
}

/// Body of every error answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// Queries left, on 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn idempotency_keys_are_short_visible_ascii() {
        assert!(valid_idempotency_key("mekd-0123abcd-42-00ff"));
        let longest = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN);
        assert!(valid_idempotency_key(&longest));
        for bad in ["", "with space", "tab\t", "é", &format!("{longest}k")] {
            assert!(!valid_idempotency_key(bad), "{bad:?}");
        }
    }
}
