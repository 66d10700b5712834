//! The two wire formats, JSON and MessagePack, for everything a node sends
//! or reads.
//!
//! Change frames are the hot path: each is encoded at most once per format
//! (see [`crate::change::Positioned`]) and the bytes are shared. The
//! MessagePack `change` frame is also what travels between nodes, so a change
//! that comes from a peer reaches MessagePack clients without re-encoding.
//!
//! JSON has no binary type: a MessagePack `bin` value is rendered as
//! `{"$binary": "<base64>"}` and an `ext` value as
//! `{"$ext": {"type": <i8>, "data": "<base64>"}}`; non-string map keys are
//! rendered as their text. A JSON publisher may send `{"$binary": ...}` and
//! MessagePack clients receive real `bin` bytes.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use bytestring::ByteString;
use rmpv::Value;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

use crate::change::{validate, Change, Position, Positioned};
use crate::interest::Interest;

/// How a session talks: negotiated by the WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ripple.v1.json`, text frames (the default).
    Json,
    /// `ripple.v1.msgpack`, binary frames.
    MsgPack,
}

impl Format {
    pub const JSON_PROTOCOL: &'static str = "ripple.v1.json";
    pub const MSGPACK_PROTOCOL: &'static str = "ripple.v1.msgpack";

    pub fn protocol(self) -> &'static str {
        match self {
            Format::Json => Self::JSON_PROTOCOL,
            Format::MsgPack => Self::MSGPACK_PROTOCOL,
        }
    }
}

/// An encoded frame, ready for a WebSocket: cheap to clone.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(ByteString),
    Binary(Bytes),
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame of a change in the given format.
    pub fn change(change: &Positioned, format: Format) -> Frame {
        match format {
            Format::Json => Frame::Text(change.json_frame().clone()),
            Format::MsgPack => Frame::Binary(change.msgpack_frame().clone()),
        }
    }

    /// Encodes any server message in the given format.
    pub fn encode<T: Serialize>(message: &T, format: Format) -> Frame {
        match format {
            Format::Json => {
                let text = serde_json::to_string(message).expect("server messages encode");
                Frame::Text(ByteString::from(text))
            }
            Format::MsgPack => {
                let bytes = rmp_serde::to_vec_named(message).expect("server messages encode");
                Frame::Binary(Bytes::from(bytes))
            }
        }
    }
}

/// The shape of a `change` frame, generic over how `data` is rendered.
#[derive(Serialize)]
struct ChangeOut<'a, D: Serialize> {
    op: &'static str,
    pos: (&'a str, u64, u64),
    ts: u64,
    workspace: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    lists: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<D>,
}

fn change_out<'a, D: Serialize>(p: &'a Positioned, data: Option<D>) -> ChangeOut<'a, D> {
    ChangeOut {
        op: "change",
        pos: (&p.pos.origin, p.pos.epoch, p.pos.seq),
        ts: p.ts,
        workspace: &p.change.workspace,
        record: p.change.record.as_deref(),
        lists: &p.change.lists,
        kind: p.change.kind.as_deref(),
        data,
    }
}

pub fn encode_change_json(p: &Positioned) -> ByteString {
    let out = change_out(p, p.change.data.as_ref().map(JsonValue));
    ByteString::from(serde_json::to_string(&out).expect("a change encodes as JSON"))
}

pub fn encode_change_msgpack(p: &Positioned) -> Bytes {
    let out = change_out(p, p.change.data.as_ref());
    Bytes::from(rmp_serde::to_vec_named(&out).expect("a change encodes as MessagePack"))
}

#[derive(Deserialize)]
struct ChangeIn {
    op: String,
    pos: (String, u64, u64),
    ts: u64,
    workspace: String,
    #[serde(default)]
    record: Option<String>,
    #[serde(default)]
    lists: Vec<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

/// Reads a MessagePack `change` frame (as a node or a client receives it).
pub fn decode_change_msgpack(frame: &[u8]) -> Result<(Position, u64, Change), String> {
    let c: ChangeIn = rmp_serde::from_slice(frame).map_err(|e| e.to_string())?;
    if c.op != "change" {
        return Err(format!("expected a change frame, got op {:?}", c.op));
    }
    let pos = Position {
        origin: c.pos.0.into(),
        epoch: c.pos.1,
        seq: c.pos.2,
    };
    let change = Change {
        workspace: c.workspace,
        record: c.record,
        lists: c.lists,
        kind: c.kind,
        data: c.data,
    };
    Ok((pos, c.ts, change))
}

/// Renders a MessagePack value as JSON (see the module header for bin and
/// ext).
pub struct JsonValue<'a>(pub &'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Nil => s.serialize_unit(),
            Value::Boolean(b) => s.serialize_bool(*b),
            Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
                (Some(u), _) => s.serialize_u64(u),
                (_, Some(i)) => s.serialize_i64(i),
                _ => s.serialize_unit(),
            },
            Value::F32(f) if f.is_finite() => s.serialize_f32(*f),
            Value::F64(f) if f.is_finite() => s.serialize_f64(*f),
            Value::F32(_) | Value::F64(_) => s.serialize_unit(),
            Value::String(text) => match text.as_str() {
                Some(t) => s.serialize_str(t),
                None => s.serialize_str(&String::from_utf8_lossy(text.as_bytes())),
            },
            Value::Binary(bytes) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("$binary", &BASE64.encode(bytes))?;
                map.end()
            }
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&JsonValue(item))?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    match k.as_str() {
                        Some(key) => map.serialize_entry(key, &JsonValue(v))?,
                        None => map.serialize_entry(&k.to_string(), &JsonValue(v))?,
                    }
                }
                map.end()
            }
            Value::Ext(kind, data) => {
                #[derive(Serialize)]
                struct Ext {
                    #[serde(rename = "type")]
                    kind: i8,
                    data: String,
                }
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(
                    "$ext",
                    &Ext {
                        kind: *kind,
                        data: BASE64.encode(data),
                    },
                )?;
                map.end()
            }
        }
    }
}

/// Turns a JSON value into the MessagePack value it stands for: the
/// reverse of [`JsonValue`] for `{"$binary": "<base64>"}`.
pub fn json_to_value(json: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Boolean(b),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::String(s.into()),
        J::Array(items) => Value::Array(items.into_iter().map(json_to_value).collect()),
        J::Object(map) => {
            if map.len() == 1 {
                if let Some(J::String(b64)) = map.get("$binary") {
                    if let Ok(bytes) = BASE64.decode(b64) {
                        return Value::Binary(bytes);
                    }
                }
            }
            Value::Map(
                map.into_iter()
                    .map(|(k, v)| (Value::from(k), json_to_value(v)))
                    .collect(),
            )
        }
    }
}

/// Decodes a publish body into changes, refusing the whole batch on the
/// first broken rule.
pub fn decode_publish(
    body: &[u8],
    format: Format,
    max_batch: usize,
) -> Result<Vec<Change>, String> {
    let value = match format {
        Format::MsgPack => {
            let mut reader = body;
            let value = rmpv::decode::read_value(&mut reader)
                .map_err(|e| format!("the body is not valid MessagePack: {e}"))?;
            if !reader.is_empty() {
                return Err(
                    "the body holds bytes after its MessagePack value; send one change \
                            or one array of changes"
                        .into(),
                );
            }
            value
        }
        Format::Json => {
            let json: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| format!("the body is not valid JSON: {e}"))?;
            json_to_value(json)
        }
    };
    let items = match value {
        rmpv::Value::Array(items) => items,
        single => vec![single],
    };
    if items.len() > max_batch {
        return Err(format!(
            "a batch may hold at most {max_batch} changes; it holds {}",
            items.len()
        ));
    }
    let many = items.len() > 1;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            validate(item).map_err(|e| {
                if many {
                    format!("change {i}: {e}")
                } else {
                    e.to_string()
                }
            })
        })
        .collect()
}

/// What a cursor looks like on the wire: origin -> `[epoch, seq]`.
pub type WireCursor = HashMap<String, (u64, u64)>;

/// A message from a client.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientMessage {
    Hello {
        /// Missing reads as empty, so that "no token" is refused like a bad
        /// one (4001), not as a malformed message (4002).
        #[serde(default)]
        token: String,
        #[serde(default)]
        resume: Option<Resume>,
    },
    Subscribe {
        #[serde(default)]
        id: Option<u64>,
        interests: Vec<Interest>,
    },
    Unsubscribe {
        #[serde(default)]
        id: Option<u64>,
        interests: Vec<Interest>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    #[serde(default)]
    pub cursor: WireCursor,
    #[serde(default)]
    pub interests: Vec<Interest>,
}

impl ClientMessage {
    pub fn from_json(text: &[u8]) -> Result<ClientMessage, String> {
        serde_json::from_slice(text).map_err(|e| e.to_string())
    }

    pub fn from_msgpack(bytes: &[u8]) -> Result<ClientMessage, String> {
        rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// Server messages other than changes.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerMessage<'a> {
    Welcome {
        node: &'a str,
        session: &'a str,
        position: &'a WireCursor,
        recovered: bool,
        missed: u64,
    },
    Subscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Unsubscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: &'a str,
        message: &'a str,
        /// The interests refused, when the error is about interests.
        #[serde(skip_serializing_if = "Option::is_none")]
        interests: Option<&'a [Interest]>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(data: Option<Value>) -> Positioned {
        let change = Change {
            workspace: "acme".into(),
            record: Some("r1".into()),
            lists: vec!["deals".into()],
            kind: Some("update".into()),
            data,
        };
        Positioned::new(
            Position {
                origin: "n1".into(),
                epoch: 7,
                seq: 3,
            },
            99,
            change,
        )
    }

    #[test]
    fn json_change_frame_renders_binary_as_base64() {
        let p = sample(Some(Value::Map(vec![(
            "b".into(),
            Value::Binary(vec![0, 255]),
        )])));
        let json: serde_json::Value = serde_json::from_str(p.json_frame()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "change", "pos": ["n1", 7, 3], "ts": 99,
                "workspace": "acme", "record": "r1", "lists": ["deals"], "kind": "update",
                "data": {"b": {"$binary": "AP8="}}})
        );
    }

    #[test]
    fn msgpack_change_frame_round_trips() {
        let data = Value::Array(vec![
            Value::Binary(vec![1]),
            Value::from(-5),
            Value::F64(1.5),
        ]);
        let p = sample(Some(data.clone()));
        let (pos, ts, change) = decode_change_msgpack(p.msgpack_frame()).unwrap();
        assert_eq!(pos, p.pos);
        assert_eq!(ts, 99);
        assert_eq!(change, p.change);
    }

    #[test]
    fn json_binary_becomes_msgpack_binary() {
        let v = json_to_value(serde_json::json!({"x": {"$binary": "AP8="}, "n": -1}));
        let Value::Map(entries) = v else { panic!() };
        assert!(entries.contains(&("x".into(), Value::Binary(vec![0, 255]))));
    }

    #[test]
    fn client_messages_parse_in_both_formats() {
        let hello = br#"{"op":"hello","token":"t","resume":{"cursor":{"n1":[1,2]},
            "interests":[{"workspace":"w","list":"l"}]}}"#;
        let ClientMessage::Hello {
            resume: Some(r), ..
        } = ClientMessage::from_json(hello).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.cursor["n1"], (1, 2));

        let json: serde_json::Value =
            serde_json::json!({"op": "subscribe", "id": 7, "interests": [{"workspace": "w"}]});
        let bytes = rmp_serde::to_vec_named(&json).unwrap();
        assert!(matches!(
            ClientMessage::from_msgpack(&bytes).unwrap(),
            ClientMessage::Subscribe { id: Some(7), .. }
        ));
        assert!(ClientMessage::from_json(br#"{"op":"dance"}"#).is_err());
    }
}
