//! The ingest log's Redis commands: one stream, whose entries carry a nonce (`n`, so that
//! an append whose answer was lost can be looked up) and the events (`e1`, the
//! [`wire`](crate::cluster::wire) encoding).

use crate::store::{RedisStore, StoreError, StreamId};
use bb8_redis::redis;
use bytes::Bytes;

/// The field holding an entry's nonce.
const NONCE: &str = "n";
/// The field holding an entry's events.
const EVENTS: &str = "e1";

/// One entry read back.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    /// Its id.
    pub id: StreamId,
    /// Its events, when it has the events field.
    pub events: Option<Bytes>,
}

/// The log stream `key` in `store`.
#[derive(Clone, Debug)]
pub struct RedisLog {
    store: RedisStore,
    key: String,
}

type RawEntries = Vec<(String, Vec<Vec<u8>>)>;

/// The value of field `name` in an entry's flat field list.
fn field(fields: Vec<Vec<u8>>, name: &str) -> Option<Vec<u8>> {
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if k == name.as_bytes() {
            return Some(v);
        }
    }
    None
}

impl RedisLog {
    /// The stream under `key`.
    pub fn new(store: RedisStore, key: String) -> Self {
        Self { store, key }
    }

    /// The stream's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `XADD key MAXLEN ~ maxlen * n nonce e1 events`: the new entry's id.
    pub async fn append(
        &self,
        maxlen: usize,
        nonce: &[u8],
        events: &[u8],
    ) -> Result<StreamId, StoreError> {
        let id: String = self
            .store
            .with_conn(|mut conn| async move {
                redis::cmd("XADD")
                    .arg(&self.key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(maxlen)
                    .arg("*")
                    .arg(NONCE)
                    .arg(nonce)
                    .arg(EVENTS)
                    .arg(events)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        StreamId::parse(&id).ok_or_else(|| bad_reply("XADD", &id))
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
        Ok(raw.into_iter().next().and_then(|(id, fields)| {
            let id = StreamId::parse(&id)?;
            Some((id, field(fields, NONCE)))
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
                Some(RawEntry {
                    id: StreamId::parse(&id)?,
                    events: field(fields, EVENTS).map(Bytes::from),
                })
            })
            .collect())
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
