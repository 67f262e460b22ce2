//! The id of a Redis stream entry: the anomaly stream's and the ingest log's.

/// A stream entry id, `<milliseconds>-<sequence>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    /// Parses `ms-seq` (or a bare `ms`, meaning `ms-0`).
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}
