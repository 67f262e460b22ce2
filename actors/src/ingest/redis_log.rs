//! The ingest log's Redis commands: one stream, whose entries carry a nonce (`n`, so that
//! an append whose answer was lost can be looked up), the events (`e1`, the
//! [`wire`](crate::cluster::wire) encoding) and, in a cluster, the epoch of each shard
//! they belong to (`t`: per shard, u32 LE shard and u64 LE epoch).

use crate::store::{RedisStore, StoreError, StreamId};
use bb8_redis::redis;
use bytes::Bytes;
use std::sync::LazyLock;

/// The field holding an entry's nonce.
const NONCE: &str = "n";
/// The field holding an entry's events.
const EVENTS: &str = "e1";
/// The field holding an entry's shard epochs.
const TAGS: &str = "t";
/// The largest stream id: an entry with it seals the stream (every later `XADD … *`
/// fails).
const SEAL_ID: &str = "18446744073709551615-18446744073709551615";

/// Takes or renews the stream's writer key for ARGV[1] (free, or already ARGV[1]'s) for
/// ARGV[2] ms: 1, or 0 when another node holds it.
static CLAIM_WRITER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Creates the stream KEYS[1] empty (an entry added and deleted again).
static CREATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local id = redis.call('XADD', KEYS[1], '*', 'created', '1')
redis.call('XDEL', KEYS[1], id)
"#,
    )
});

/// Removes the writer key if it is still ARGV[1]'s.
static RELEASE_WRITER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// One entry read back.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    /// Its id.
    pub id: StreamId,
    /// Its events, when it has the events field.
    pub events: Option<Bytes>,
    /// Its shards' epochs (empty on a single node).
    pub tags: Vec<(u32, u64)>,
}

/// Encodes shard epochs for the `t` field.
pub fn encode_tags(tags: impl Iterator<Item = (u32, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (shard, epoch) in tags {
        out.extend(shard.to_le_bytes());
        out.extend(epoch.to_le_bytes());
    }
    out
}

/// Decodes the `t` field (`None`: not a whole number of pairs).
pub fn decode_tags(bytes: &[u8]) -> Option<Vec<(u32, u64)>> {
    if bytes.len() % 12 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(12)
            .map(|c| {
                let (shard, epoch) = c.split_at(4);
                let shard = u32::from_le_bytes(shard.try_into().unwrap_or_default());
                let epoch = u64::from_le_bytes(epoch.try_into().unwrap_or_default());
                (shard, epoch)
            })
            .collect(),
    )
}

/// The log stream `key` in `store`.
#[derive(Clone, Debug)]
pub struct RedisLog {
    store: RedisStore,
    key: String,
}

type RawEntries = Vec<(String, Vec<Vec<u8>>)>;

/// Takes the value of field `name` out of an entry's flat field list.
fn field(fields: &mut [Vec<u8>], name: &str) -> Option<Vec<u8>> {
    fields
        .chunks_exact_mut(2)
        .find(|pair| pair[0] == name.as_bytes())
        .map(|pair| std::mem::take(&mut pair[1]))
}

impl RedisLog {
    /// The stream under `key`.
    pub fn new(store: RedisStore, key: String) -> Self {
        Self { store, key }
    }

    /// The stream `key` in the same store.
    pub fn with_key(&self, key: String) -> Self {
        Self {
            store: self.store.clone(),
            key,
        }
    }

    /// The stream's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `XADD key [NOMKSTREAM] MAXLEN ~ maxlen * n nonce e1 events [t tags]`: the new
    /// entry's id. With `existing` (a cluster member's stream) the stream must exist
    /// already: an append to a stream that is gone fails with [`StoreError::StreamGone`]
    /// instead of creating it again (see [`RedisLog::create`]).
    pub async fn append(
        &self,
        maxlen: usize,
        nonce: &[u8],
        events: &[u8],
        tags: &[u8],
        existing: bool,
    ) -> Result<StreamId, StoreError> {
        let id: Option<String> = self
            .store
            .with_conn(|mut conn| async move {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(&self.key);
                if existing {
                    cmd.arg("NOMKSTREAM");
                }
                cmd.arg("MAXLEN")
                    .arg("~")
                    .arg(maxlen)
                    .arg("*")
                    .arg(NONCE)
                    .arg(nonce)
                    .arg(EVENTS)
                    .arg(events);
                if !tags.is_empty() {
                    cmd.arg(TAGS).arg(tags);
                }
                cmd.query_async(&mut conn).await
            })
            .await?;
        let id = id.ok_or_else(|| StoreError::StreamGone(self.key.clone()))?;
        StreamId::parse(&id).ok_or_else(|| bad_reply("XADD", &id))
    }

    /// Creates the stream, empty, for [`RedisLog::append`] with `existing`. A cluster
    /// member creates each stream of its own once, before the table registers it: a
    /// stream is sealed and collected only once registered, so a member that was
    /// declared dead meanwhile (paused, cut off) can never bring a collected stream back
    /// and acknowledge events in it that nobody replays.
    pub async fn create(&self) -> Result<(), StoreError> {
        self.store.eval::<()>(&CREATE, &[&self.key], &[]).await
    }

    /// The newest entry's id and nonce, if the stream has an entry.
    pub async fn last(&self) -> Result<Option<(StreamId, Option<Vec<u8>>)>, StoreError> {
        let raw: RawEntries = self
            .store
            .with_conn(|mut conn| async move {
                redis::cmd("XREVRANGE")
                    .arg(&self.key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw.into_iter().next().and_then(|(id, mut fields)| {
            let id = StreamId::parse(&id)?;
            Some((id, field(&mut fields, NONCE)))
        }))
    }

    /// Up to `count` entries after `after` (from the first when `None`), oldest first.
    pub async fn range(
        &self,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<RawEntry>, StoreError> {
        let start = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        let raw: RawEntries = self
            .store
            .with_conn(|mut conn| async move {
                redis::cmd("XRANGE")
                    .arg(&self.key)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(id, fields)| {
                let (id, mut fields) = (StreamId::parse(&id)?, fields);
                let tags = field(&mut fields, TAGS);
                Some(RawEntry {
                    id,
                    events: field(&mut fields, EVENTS).map(Bytes::from),
                    tags: tags.as_deref().and_then(decode_tags).unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Seals the stream: adds an entry with the largest id, so that every later append
    /// fails (a node declared dead can then acknowledge nothing more). Sealing a sealed
    /// stream is a no-op.
    pub async fn seal(&self) -> Result<(), StoreError> {
        let sealed: Result<String, StoreError> = self
            .store
            .with_conn(|mut conn| async move {
                redis::cmd("XADD")
                    .arg(&self.key)
                    .arg(SEAL_ID)
                    .arg("sealed")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await;
        match sealed {
            Ok(_) => Ok(()),
            // Its top is the largest id already.
            Err(StoreError::Redis(e)) if matches!(e.kind(), redis::ErrorKind::Server(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the stream exists.
    pub async fn exists(&self) -> Result<bool, StoreError> {
        self.store
            .with_conn(|mut conn| async move {
                redis::cmd("EXISTS")
                    .arg(&self.key)
                    .query_async::<bool>(&mut conn)
                    .await
            })
            .await
    }

    /// The key naming the node that appends to this stream.
    fn writer_key(&self) -> String {
        format!("{}:writer", self.key)
    }

    /// Takes (or renews) this stream for writer `me` for `lease`: false while another
    /// writer holds it.
    pub async fn claim_writer(
        &self,
        me: &str,
        lease: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let taken: i64 = self
            .store
            .eval(
                &CLAIM_WRITER,
                &[&self.writer_key()],
                &[me, &lease.as_millis().max(1).to_string()],
            )
            .await?;
        Ok(taken == 1)
    }

    /// Gives the stream up, if `me` still holds it.
    pub async fn release_writer(&self, me: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .store
            .eval(&RELEASE_WRITER, &[&self.writer_key()], &[me])
            .await?;
        Ok(())
    }

    /// `XDEL key id`.
    pub async fn delete(&self, id: StreamId) -> Result<(), StoreError> {
        self.store
            .with_conn(|mut conn| async move {
                redis::cmd("XDEL")
                    .arg(&self.key)
                    .arg(id.to_string())
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    /// Drops the entries below `min` (`XTRIM key MINID ~ min`: whole internal nodes only,
    /// so a few older entries may stay); answers the stream's length and its first entry.
    pub async fn trim(&self, min: StreamId) -> Result<(usize, Option<StreamId>), StoreError> {
        let (len, first): (usize, RawEntries) = self
            .store
            .with_conn(|mut conn| async move {
                redis::pipe()
                    .cmd("XTRIM")
                    .arg(&self.key)
                    .arg("MINID")
                    .arg("~")
                    .arg(min.to_string())
                    .ignore()
                    .cmd("XLEN")
                    .arg(&self.key)
                    .cmd("XRANGE")
                    .arg(&self.key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok((
            len,
            first
                .into_iter()
                .next()
                .and_then(|(id, _)| StreamId::parse(&id)),
        ))
    }
}

fn bad_reply(command: &str, reply: &str) -> StoreError {
    StoreError::Redis(redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply",
        format!("{command} answered {reply:?}"),
    )))
}
