//! Changes, positions and cursors: the data every other part moves around.
//!
//! A change arrives from a publisher as a MessagePack (or JSON) map and is
//! checked here against the rules of PROTOCOL.md, as a whole: the first
//! broken rule refuses it, and the error names that rule. Once its origin
//! gives it a position it becomes a [`Positioned`] change, shared by
//! reference between the history, the Router and every session.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use bytestring::ByteString;
use rmpv::Value;
use thiserror::Error;

/// Longest identifier (workspace, record, list, node id), in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Most lists one change may name.
pub const MAX_LISTS: usize = 64;
/// Longest `kind`, in bytes.
pub const MAX_KIND_BYTES: usize = 256;

/// Why a change was refused. The message names the rule so that the
/// publisher can fix the change without reading our source.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChangeError {
    #[error("a change must be a map with a `workspace` key")]
    NotAMap,
    #[error("`workspace` is required")]
    MissingWorkspace,
    #[error("`{field}` must be a string")]
    NotAString { field: &'static str },
    #[error("`{field}` must be a non-empty UTF-8 string of at most 256 bytes")]
    BadIdentifier { field: &'static str },
    #[error("`lists` must be an array of strings")]
    ListsNotArray,
    #[error("`lists` may name at most {MAX_LISTS} lists")]
    TooManyLists,
    #[error("`kind` must be at most {MAX_KIND_BYTES} bytes")]
    KindTooLong,
    #[error("unknown field `{0}`: a change has workspace, record, lists, kind and data")]
    UnknownField(String),
    #[error("map keys must be strings")]
    KeyNotAString,
}

/// A change as its publisher described it, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub workspace: String,
    pub record: Option<String>,
    pub lists: Vec<String>,
    pub kind: Option<String>,
    /// The payload, forwarded untouched. `None` when the publisher sent none.
    pub data: Option<Value>,
}

/// Where a change stands in its origin's sequence: `[origin, epoch, seq]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub origin: Arc<str>,
    pub epoch: u64,
    pub seq: u64,
}

/// A change with its position and acceptance time, as kept in history and
/// sent to sessions. Its wire encodings are made at most once each, on first
/// use, and then shared by every session that receives it.
#[derive(Debug)]
pub struct Positioned {
    pub pos: Position,
    /// Milliseconds since the Unix epoch at which the origin accepted it.
    pub ts: u64,
    pub change: Change,
    json: OnceLock<ByteString>,
    msgpack: OnceLock<Bytes>,
}

impl Positioned {
    pub fn new(pos: Position, ts: u64, change: Change) -> Positioned {
        Positioned {
            pos,
            ts,
            change,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// Builds a positioned change from a MessagePack `change` frame whose
    /// bytes are kept as its MessagePack encoding.
    pub fn with_msgpack(pos: Position, ts: u64, change: Change, frame: Bytes) -> Positioned {
        let positioned = Positioned::new(pos, ts, change);
        let _ = positioned.msgpack.set(frame);
        positioned
    }

    /// The `{"op":"change",...}` text frame.
    pub fn json_frame(&self) -> &ByteString {
        self.json
            .get_or_init(|| crate::codec::encode_change_json(self))
    }

    /// The `{"op":"change",...}` MessagePack frame.
    pub fn msgpack_frame(&self) -> &Bytes {
        self.msgpack
            .get_or_init(|| crate::codec::encode_change_msgpack(self))
    }

    /// The length of its frame in `format`, without touching the frame's
    /// reference count (this runs once per delivery).
    pub fn frame_len(&self, format: crate::codec::Format) -> usize {
        match format {
            crate::codec::Format::Json => self.json_frame().len(),
            crate::codec::Format::MsgPack => self.msgpack_frame().len(),
        }
    }

    /// Rough bytes this change holds in memory, for the history gauge.
    pub fn weight(&self) -> usize {
        let c = &self.change;
        std::mem::size_of::<Positioned>()
            + c.workspace.len()
            + c.record.as_ref().map_or(0, |r| r.len())
            + c.lists.iter().map(|l| l.len() + 24).sum::<usize>()
            + c.kind.as_ref().map_or(0, |k| k.len())
            + self.json.get().map_or(0, |j| j.len())
            + self.msgpack.get().map_or(0, |m| m.len())
    }
}

fn identifier(field: &'static str, value: Value) -> Result<String, ChangeError> {
    match value {
        Value::String(s) => match s.into_str() {
            Some(s) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Ok(s),
            _ => Err(ChangeError::BadIdentifier { field }),
        },
        _ => Err(ChangeError::NotAString { field }),
    }
}

/// Checks one change, given as a decoded MessagePack value.
pub fn validate(value: Value) -> Result<Change, ChangeError> {
    let Value::Map(entries) = value else {
        return Err(ChangeError::NotAMap);
    };

    let mut workspace = None;
    let mut change = Change {
        workspace: String::new(),
        record: None,
        lists: Vec::new(),
        kind: None,
        data: None,
    };
    for (key, value) in entries {
        let Value::String(key) = key else {
            return Err(ChangeError::KeyNotAString);
        };
        let key = key.into_str().ok_or(ChangeError::KeyNotAString)?;
        // nil stands for "absent" in every optional field.
        if value.is_nil() && key != "workspace" {
            continue;
        }
        match key.as_str() {
            "workspace" => workspace = Some(identifier("workspace", value)?),
            "record" => change.record = Some(identifier("record", value)?),
            "lists" => {
                let Value::Array(items) = value else {
                    return Err(ChangeError::ListsNotArray);
                };
                if items.len() > MAX_LISTS {
                    return Err(ChangeError::TooManyLists);
                }
                for item in items {
                    let list = identifier("lists", item)?;
                    if !change.lists.contains(&list) {
                        change.lists.push(list);
                    }
                }
            }
            "kind" => match value {
                Value::String(s) => {
                    let s = s
                        .into_str()
                        .ok_or(ChangeError::NotAString { field: "kind" })?;
                    if s.len() > MAX_KIND_BYTES {
                        return Err(ChangeError::KindTooLong);
                    }
                    change.kind = Some(s);
                }
                _ => return Err(ChangeError::NotAString { field: "kind" }),
            },
            "data" => change.data = Some(value),
            _ => return Err(ChangeError::UnknownField(key)),
        }
    }
    change.workspace = workspace.ok_or(ChangeError::MissingWorkspace)?;
    Ok(change)
}

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        )
    }

    #[test]
    fn accepts_a_full_change() {
        let change = validate(map(vec![
            ("workspace", "acme".into()),
            ("record", "r1".into()),
            (
                "lists",
                Value::Array(vec!["a".into(), "b".into(), "a".into()]),
            ),
            ("kind", "update".into()),
            ("data", Value::Binary(vec![1, 2])),
        ]))
        .unwrap();
        assert_eq!(change.workspace, "acme");
        assert_eq!(change.lists, vec!["a", "b"], "duplicate lists collapse");
        assert_eq!(change.data, Some(Value::Binary(vec![1, 2])));
    }

    #[test]
    fn names_the_broken_rule() {
        let cases = vec![
            (Value::from(3), ChangeError::NotAMap),
            (map(vec![]), ChangeError::MissingWorkspace),
            (
                map(vec![("workspace", "".into())]),
                ChangeError::BadIdentifier { field: "workspace" },
            ),
            (
                map(vec![("workspace", 5.into())]),
                ChangeError::NotAString { field: "workspace" },
            ),
            (
                map(vec![
                    ("workspace", "w".into()),
                    ("record", "x".repeat(257).into()),
                ]),
                ChangeError::BadIdentifier { field: "record" },
            ),
            (
                map(vec![("workspace", "w".into()), ("lists", "l".into())]),
                ChangeError::ListsNotArray,
            ),
            (
                map(vec![("workspace", "w".into()), ("color", "red".into())]),
                ChangeError::UnknownField("color".into()),
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(validate(value.clone()), Err(expected), "{value}");
        }
    }

    #[test]
    fn nil_means_absent() {
        let change = validate(map(vec![("workspace", "w".into()), ("record", Value::Nil)]));
        assert_eq!(change.unwrap().record, None);
    }
}
