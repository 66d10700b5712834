//! Malformed input, from clients and from publishers, is refused with the
//! close code or status the protocol gives it, and costs nothing else: the
//! node stays up, other sessions keep receiving, and a refused publish
//! leaves no trace (no position taken, nothing delivered).

mod common;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const MAX_FRAME: usize = 4096;
const MAX_BODY: usize = 4096;

async fn start() -> Node {
    Node::start(|c| {
        c.limits.max_frame_bytes = MAX_FRAME;
        c.limits.max_publish_bytes = MAX_BODY;
        c.limits.max_batch = 10;
        c.limits.max_interests = 3;
    })
    .await
}

/// A client that stays subscribed to `w` through the test.
async fn bystander(node: &Node) -> Client {
    let mut client = Client::connect_hello(node, Wire::MsgPack).await;
    client.subscribe(1, json!([{"workspace": "w"}])).await;
    client
}

/// Connects, says hello if asked, sends `frame`; expects a close with `code`.
async fn closes(node: &Node, wire: Wire, hello: bool, frame: Message, code: u16) -> String {
    let mut client = Client::connect(node, wire).await;
    if hello {
        client.hello(&token_all(), None).await;
    }
    client.send_raw(frame).await;
    client.expect_close(code).await
}

fn text(value: Value) -> Message {
    Message::Text(value.to_string())
}

fn msgpack(value: Value) -> Message {
    Message::Binary(rmp_serde::to_vec_named(&value).unwrap())
}

#[tokio::test]
async fn bad_client_messages_close_with_their_codes() {
    let node = start().await;
    let mut watcher = bystander(&node).await;
    let subscribe = json!({"op": "subscribe", "id": 1, "interests": [{"workspace": "w"}]});

    // A message before hello.
    let reason = closes(&node, Wire::Json, false, text(subscribe.clone()), 4002).await;
    assert!(reason.contains("hello"), "{reason}");
    closes(
        &node,
        Wire::MsgPack,
        false,
        msgpack(subscribe.clone()),
        4002,
    )
    .await;
    // Not JSON, not MessagePack.
    closes(
        &node,
        Wire::Json,
        true,
        Message::Text("{not json".into()),
        4002,
    )
    .await;
    closes(&node, Wire::Json, false, Message::Text("".into()), 4002).await;
    closes(
        &node,
        Wire::MsgPack,
        true,
        Message::Binary(vec![0xc1]),
        4002,
    )
    .await;
    closes(
        &node,
        Wire::MsgPack,
        false,
        Message::Binary(vec![0x81, 0xa2]),
        4002,
    )
    .await;
    // An unknown op, and a second hello.
    let reason = closes(&node, Wire::Json, true, text(json!({"op": "dance"})), 4002).await;
    assert!(
        reason.contains("dance"),
        "the reason names the op: {reason}"
    );
    closes(
        &node,
        Wire::MsgPack,
        true,
        msgpack(json!({"op": "dance"})),
        4002,
    )
    .await;
    let hello = json!({"op": "hello", "token": token_all()});
    closes(&node, Wire::Json, true, text(hello), 4002).await;
    // Wrong types and unknown fields.
    for bad in [
        json!({"op": "subscribe", "id": "seven", "interests": [{"workspace": "w"}]}),
        json!({"op": "subscribe", "id": 1, "interests": {"workspace": "w"}}),
        json!({"op": "subscribe", "id": 1, "interests": [{"workspace": 5}]}),
        json!({"op": "subscribe", "id": 1, "interests": [{"workspace": "w", "color": "red"}]}),
        json!({"op": "subscribe", "id": 1, "interests": [], "extra": true}),
        json!({"op": 3}),
        json!([1, 2, 3]),
    ] {
        closes(&node, Wire::Json, true, text(bad.clone()), 4002).await;
        closes(&node, Wire::MsgPack, true, msgpack(bad), 4002).await;
    }
    closes(
        &node,
        Wire::Json,
        false,
        text(json!({"op": "hello", "token": 5})),
        4002,
    )
    .await;
    // Too big, in both formats, before and after hello.
    let big = "x".repeat(MAX_FRAME + 1);
    let reason = closes(&node, Wire::Json, true, Message::Text(big.clone()), 1009).await;
    assert!(
        reason.contains(&MAX_FRAME.to_string()),
        "the reason gives the limit: {reason}"
    );
    closes(
        &node,
        Wire::MsgPack,
        false,
        Message::Binary(big.into_bytes()),
        1009,
    )
    .await;
    // Just under the limit is fine (and malformed, so 4002, not 1009).
    let under = format!("\"{}\"", "x".repeat(MAX_FRAME - 2));
    closes(&node, Wire::Json, true, Message::Text(under), 4002).await;

    // The node is up, and the bystander lost nothing.
    let fence = node.publish_one(json!({"workspace": "w"})).await;
    watcher.expect_only(&fence).await;
    assert_eq!(node.metric("ripple_sessions").await, 1.0);
}

#[tokio::test]
async fn bad_interests_are_refused_and_the_session_goes_on() {
    let node = start().await;
    let mut client = Client::connect_hello(&node, Wire::Json).await;
    client
        .subscribe(1, json!([{"workspace": "w", "list": "l"}]))
        .await;

    for (id, interests, code) in [
        (2, json!([{"workspace": ""}]), "invalid"),
        (
            3,
            json!([{"workspace": "w", "list": "a", "record": "b"}]),
            "invalid",
        ),
        (
            4,
            json!([{"workspace": "w", "record": "x".repeat(257)}]),
            "invalid",
        ),
        (
            5,
            json!([{"workspace": "w", "list": "ok"}, {"workspace": "w", "list": ""}]),
            "invalid",
        ),
        // One held, three more asked for, three allowed.
        (
            6,
            json!([{"workspace": "w", "record": "1"}, {"workspace": "w", "record": "2"},
                   {"workspace": "w", "record": "3"}]),
            "too_many_interests",
        ),
    ] {
        client
            .send(json!({"op": "subscribe", "id": id, "interests": interests}))
            .await;
        let error = client.reply(id).await;
        assert_eq!(error["op"], "error", "{error}");
        assert_eq!(error["code"], code, "{error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    // Nothing of the refused requests stuck: two more still fit.
    client
        .subscribe(
            7,
            json!([{"workspace": "w", "record": "1"}, {"workspace": "w", "record": "2"}]),
        )
        .await;

    let positions = node
        .publish(json!([
            {"workspace": "w", "lists": ["ok"]},
            {"workspace": "w", "record": "3"},
            {"workspace": "w", "record": "2"},
            {"workspace": "w", "lists": ["l"]},
        ]))
        .await;
    assert_eq!(client.positions_until(&positions[3]).await, positions[2..]);
}

/// Posts a publish; expects `status` and an `{"error": ...}` answer in JSON.
async fn refused(
    node: &Node,
    content_type: Option<&str>,
    key: Option<&str>,
    body: Vec<u8>,
    status: u16,
) -> String {
    let (got, answer) = node.post_publish(content_type, key, body).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    assert_eq!(got, status, "answer: {text}");
    let answer: Value = serde_json::from_slice(&answer).expect("a JSON error answer");
    answer["error"]
        .as_str()
        .expect("an error message")
        .to_string()
}

#[tokio::test]
async fn bad_publishes_are_refused_whole_and_leave_no_trace() {
    let node = start().await;
    let mut watcher = bystander(&node).await;
    let before = node.publish_one(json!({"workspace": "w"})).await;
    let json_type = Some("application/json");
    let good = serde_json::to_vec(&json!({"workspace": "w"})).unwrap();

    // Keys.
    let message = refused(&node, json_type, None, good.clone(), 401).await;
    assert!(message.contains("Bearer"), "{message}");
    refused(&node, json_type, Some("wrong-key"), good.clone(), 401).await;
    refused(&node, json_type, Some(""), good.clone(), 401).await;
    // Content types.
    let key = Some(PUBLISH_KEY);
    refused(&node, Some("text/plain"), key, good.clone(), 415).await;
    refused(&node, None, key, good.clone(), 415).await;
    refused(&node, Some("application/xml"), key, good.clone(), 415).await;
    // Bodies that do not parse.
    let message = refused(&node, json_type, key, b"{\"workspace\":".to_vec(), 400).await;
    assert!(message.contains("JSON"), "{message}");
    refused(&node, json_type, key, Vec::new(), 400).await;
    // Too big.
    let big = serde_json::to_vec(&json!({"workspace": "w", "data": "x".repeat(MAX_BODY)}));
    let message = refused(&node, json_type, key, big.unwrap(), 413).await;
    assert!(message.contains(&MAX_BODY.to_string()), "{message}");
    // Changes that break a rule, alone or in a batch.
    let cases = [
        (json!({"record": "r"}), "`workspace` is required"),
        (json!({"workspace": "w", "color": "red"}), "color"),
        (json!({"workspace": 5}), "`workspace` must be a string"),
        (
            json!({"workspace": "w", "lists": "l"}),
            "`lists` must be an array",
        ),
        (json!("w"), "map"),
        (
            json!([{"workspace": "w"}, {"workspace": "w"}, {"lists": ["x"]}]),
            "change 2: `workspace` is required",
        ),
        (
            json!([{"workspace": "w"}, {"workspace": "w", "record": ""}]),
            "change 1: `record`",
        ),
        (json!(vec![json!({"workspace": "w"}); 11]), "at most 10"),
    ];
    for (body, rule) in cases {
        let body = serde_json::to_vec(&body).unwrap();
        let message = refused(&node, json_type, key, body, 400).await;
        assert!(message.contains(rule), "{message:?} should name {rule:?}");
    }

    // MessagePack bodies, answered in MessagePack.
    let msgpack_type = Some("application/msgpack");
    let batch = json!([{"workspace": "w"}, {"workspace": "w", "kind": 7}]);
    for (body, rule) in [
        // The reserved byte 0xc1 reads as nil: not a change.
        (vec![0xc1], "must be a map"),
        (vec![0x81, 0xa9], "not valid MessagePack"),
        (vec![0x92, 0x80], "not valid MessagePack"),
        (rmp_serde::to_vec_named(&batch).unwrap(), "change 1: `kind`"),
        (
            [
                rmp_serde::to_vec_named(&json!({"workspace": "w"})).unwrap(),
                vec![0x01],
            ]
            .concat(),
            "after",
        ),
    ] {
        let (status, answer) = node.post_publish(msgpack_type, key, body).await;
        assert_eq!(status, 400);
        let answer: rmpv::Value = rmpv::decode::read_value(&mut &answer[..])
            .expect("a MessagePack error answer to a MessagePack request");
        let message = answer["error"].as_str().expect("error message");
        assert!(message.contains(rule), "{message:?} should name {rule:?}");
    }

    // Nothing refused took a position or reached anyone: the next change
    // (with a charset in its content type, which is fine) is the next seq,
    // and the bystander sees it right after `before`.
    let charset = Some("application/json; charset=utf-8");
    let (status, answer) = node.post_publish(charset, key, good.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    let after = serde_json::from_value::<Vec<Pos>>(answer["positions"].clone()).unwrap();
    let after = after[0].clone();
    // Regression: the scheme was matched case-sensitively, so `bearer <key>`
    // was refused with 401 (HTTP schemes are case-insensitive).
    let (status, _) = node
        .post_publish_with_auth(json_type, &format!("bearer  {PUBLISH_KEY}"), good)
        .await;
    assert_eq!(status, 200, "a lowercase scheme is accepted");
    assert_eq!(after.2, before.2 + 1, "refused changes took no seq");
    let last = node.publish_one(json!({"workspace": "w"})).await;
    assert_eq!(last.2, after.2 + 2);
    let got = watcher.positions_until(&last).await;
    assert_eq!(
        got.len(),
        4,
        "before, after, the lowercase one, last: {got:?}"
    );
    assert_eq!(got[..2], [before, after]);
    assert_eq!(node.metric("ripple_changes_accepted_total").await, 4.0);
}

fn fragment(
    data: &[u8],
    kind: tokio_tungstenite::tungstenite::protocol::frame::coding::Data,
    last: bool,
) -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::{coding::OpCode, Frame};
    Message::Frame(Frame::message(data.to_vec(), OpCode::Data(kind), last))
}

#[tokio::test]
async fn fragmented_messages_are_put_together_within_the_frame_limit() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::Data;
    let node = start().await;

    // Regression: fragments used to be refused with 4002; RFC 6455 allows them.
    let hello = json!({"op": "hello", "token": token_all()})
        .to_string()
        .into_bytes();
    let (head, tail) = hello.split_at(hello.len() / 2);
    let mut client = Client::connect(&node, Wire::Json).await;
    client.send_raw(fragment(head, Data::Text, false)).await;
    client.send_raw(fragment(tail, Data::Continue, true)).await;
    let welcome = client.next().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");

    // Fragments that add up past the frame limit are refused like a big frame.
    let chunk = vec![b' '; MAX_FRAME / 2 + 1];
    let mut client = Client::connect(&node, Wire::Json).await;
    client.send_raw(fragment(&chunk, Data::Text, false)).await;
    client
        .send_raw(fragment(&chunk, Data::Continue, true))
        .await;
    client.expect_close(1009).await;

    // A continuation with no message to continue is a protocol error.
    closes(
        &node,
        Wire::Json,
        true,
        fragment(b"{}", Data::Continue, true),
        4002,
    )
    .await;
}
