//! What a teacher's answers cost a client: queries (images) and the bytes of the HTTP bodies
//! that carried them, in either protocol. A local teacher counts the bodies the HTTP API would
//! have carried ([`crate::protocol::QueryResponse::wire_len`]), so every teacher kind is billed
//! by one rule.

use serde::{Deserialize, Serialize};

/// Queries and bytes exchanged with the teacher.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Images sent (one query per image).
    pub queries: u64,
    /// Bytes sent (request bodies).
    pub bytes_up: u64,
    /// Bytes received (response bodies).
    pub bytes_down: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        Usage {
            queries: self.queries + other.queries,
            bytes_up: self.bytes_up + other.bytes_up,
            bytes_down: self.bytes_down + other.bytes_down,
        }
    }
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    /// What was used between `other` (earlier) and `self`.
    fn sub(self, other: Usage) -> Usage {
        Usage {
            queries: self.queries - other.queries,
            bytes_up: self.bytes_up - other.bytes_up,
            bytes_down: self.bytes_down - other.bytes_down,
        }
    }
}
