//! Routing on one node: each change reaches exactly the sessions whose
//! interests match it (workspace, list or record), once per session however
//! many of its interests match, in both wire formats; and the data of a
//! change arrives as its publisher sent it (MessagePack `bin` stays `bin`
//! for MessagePack clients and becomes `{"$binary": ...}` in JSON).
//!
//! That something does NOT arrive is checked with a fence: a later change
//! the client does receive, before which nothing unexpected may come.

mod common;

use common::*;
use serde_json::{json, Value};

/// Expects exactly `expected` (in order) up to the fence, the last of them.
async fn expect_exactly(client: &mut Client, name: &str, expected: &[Pos]) {
    let fence = expected.last().expect("a fence");
    let got = client.positions_until(fence).await;
    assert_eq!(got, expected, "client {name} received the wrong changes");
}

#[tokio::test]
async fn each_level_gets_its_changes_and_nothing_else() {
    let node = Node::start_default().await;

    let mut workspace = Client::connect_hello(&node, Wire::Json).await;
    workspace.subscribe(1, json!([{"workspace": "w1"}])).await;
    let mut list = Client::connect_hello(&node, Wire::Json).await;
    list.subscribe(1, json!([{"workspace": "w1", "list": "L"}]))
        .await;
    let mut record = Client::connect_hello(&node, Wire::MsgPack).await;
    record
        .subscribe(1, json!([{"workspace": "w1", "record": "R"}]))
        .await;
    let mut other = Client::connect_hello(&node, Wire::MsgPack).await;
    other.subscribe(1, json!([{"workspace": "w2"}])).await;
    // One connection whose interests overlap on every level.
    let mut overlap = Client::connect_hello(&node, Wire::Json).await;
    overlap
        .subscribe(
            1,
            json!([{"workspace": "w1"}, {"workspace": "w1", "list": "L"},
                   {"workspace": "w1", "record": "R"}]),
        )
        .await;

    let positions = node
        .publish(json!([
            // 0: matches all three levels of w1.
            {"workspace": "w1", "record": "R", "lists": ["L"], "kind": "update"},
            // 1: w1, but another record and list.
            {"workspace": "w1", "record": "X", "lists": ["M"]},
            // 2: the same list and record names in another workspace.
            {"workspace": "w2", "record": "R", "lists": ["L"]},
            // 3: list only.
            {"workspace": "w1", "lists": ["M", "L"]},
            // 4: record only.
            {"workspace": "w1", "record": "R"},
            // 5: a workspace nobody wants.
            {"workspace": "w3", "record": "R", "lists": ["L"]},
            // 6: fence for every w1 client.
            {"workspace": "w1", "record": "R", "lists": ["L"]},
            // 7: fence for w2.
            {"workspace": "w2"},
        ]))
        .await;
    let p =
        |indexes: &[usize]| -> Vec<Pos> { indexes.iter().map(|&i| positions[i].clone()).collect() };

    expect_exactly(&mut workspace, "workspace", &p(&[0, 1, 3, 4, 6])).await;
    expect_exactly(&mut list, "list", &p(&[0, 3, 6])).await;
    expect_exactly(&mut record, "record", &p(&[0, 4, 6])).await;
    expect_exactly(&mut other, "other workspace", &p(&[2, 7])).await;
    // Each change once, though change 0 and 6 match three of its interests.
    expect_exactly(&mut overlap, "overlapping", &p(&[0, 1, 3, 4, 6])).await;

    let (status, metrics) = node.get("/metrics").await;
    assert_eq!(status, 200);
    // 5 + 3 + 3 + 2 + 5 deliveries: repeats are not even handed over.
    assert_eq!(metric_value(&metrics, "ripple_deliveries_total"), 18.0);
}

#[tokio::test]
async fn unsubscribe_stops_one_interest_and_keeps_the_others() {
    let node = Node::start_default().await;
    let mut client = Client::connect_hello(&node, Wire::Json).await;
    client
        .subscribe(
            1,
            json!([{"workspace": "w", "list": "a"}, {"workspace": "w", "list": "b"}]),
        )
        .await;
    client
        .unsubscribe(2, json!([{"workspace": "w", "list": "a"}]))
        .await;

    let positions = node
        .publish(json!([
            {"workspace": "w", "lists": ["a"]},
            {"workspace": "w", "lists": ["b"]},
        ]))
        .await;
    expect_exactly(&mut client, "after unsubscribe", &positions[1..]).await;
}

/// The fields of a change frame other than `data`, which formats render
/// differently.
fn envelope(change: &Value) -> Value {
    let mut change = change.clone();
    change.as_object_mut().unwrap().remove("data");
    change
}

#[tokio::test]
async fn both_formats_receive_the_same_changes_with_binary_data() {
    let node = Node::start_default().await;

    let mut json_client = Client::connect(&node, Wire::Json).await;
    assert_eq!(json_client.protocol.as_deref(), Some("ripple.v1.json"));
    json_client.hello(&token_all(), None).await;
    let mut msgpack_client = Client::connect(&node, Wire::MsgPack).await;
    assert_eq!(
        msgpack_client.protocol.as_deref(),
        Some("ripple.v1.msgpack")
    );
    msgpack_client.hello(&token_all(), None).await;
    // No subprotocol offered: JSON, the default.
    let mut default_client = Client::connect_with(&node, None, Default::default()).await;
    assert_eq!(default_client.wire, Wire::Json);
    default_client.hello(&token_all(), None).await;
    for client in [&mut json_client, &mut msgpack_client, &mut default_client] {
        client.subscribe(1, json!([{"workspace": "acme"}])).await;
    }

    // Published as MessagePack, with bin bytes (0, 1, 255) in the data.
    use rmpv::Value as M;
    let bytes = vec![0u8, 1, 255];
    let change = M::Map(vec![
        ("workspace".into(), "acme".into()),
        ("record".into(), "r1".into()),
        ("lists".into(), M::Array(vec!["deals".into()])),
        ("kind".into(), "insert".into()),
        (
            "data".into(),
            M::Map(vec![
                ("blob".into(), M::Binary(bytes.clone())),
                ("n".into(), M::from(-5)),
                ("nested".into(), M::Array(vec![M::Binary(vec![7]), M::Nil])),
            ]),
        ),
    ]);
    let from_msgpack = node.publish_msgpack(&change).await.remove(0);
    // Published as JSON, with a `$binary` value that stands for bin bytes.
    let from_json = node
        .publish_one(json!({"workspace": "acme", "data": {"blob": {"$binary": "AAH/"}}}))
        .await;

    let json_changes = json_client.changes_until(&from_json).await;
    let default_changes = default_client.changes_until(&from_json).await;
    assert_eq!(json_changes, default_changes);
    assert_eq!(json_changes.len(), 2);

    let first = msgpack_client.next_change().await;
    assert_eq!(pos_of(&first), from_msgpack);
    let raw = msgpack_client.last_raw.clone().expect("raw msgpack");
    let data = raw["data"].as_map().expect("data is a map");
    let blob = data
        .iter()
        .find(|(k, _)| k.as_str() == Some("blob"))
        .unwrap();
    assert_eq!(
        blob.1,
        M::Binary(bytes.clone()),
        "msgpack clients get real bin"
    );
    let second = msgpack_client.next_change().await;
    assert_eq!(pos_of(&second), from_json);
    let raw = msgpack_client.last_raw.clone().expect("raw msgpack");
    let data = raw["data"].as_map().expect("data is a map");
    assert_eq!(
        data[0],
        ("blob".into(), M::Binary(bytes.clone())),
        "a JSON `$binary` reaches msgpack clients as bin"
    );

    // JSON clients: `{"$binary": base64}`, other values as they were.
    assert_eq!(
        json_changes[0]["data"],
        json!({"blob": {"$binary": "AAH/"}, "n": -5, "nested": [{"$binary": "Bw=="}, null]})
    );
    assert_eq!(
        json_changes[1]["data"],
        json!({"blob": {"$binary": "AAH/"}})
    );

    // Everything but the data is the same in both formats.
    assert_eq!(envelope(&json_changes[0]), envelope(&first));
    assert_eq!(envelope(&json_changes[1]), envelope(&second));
    assert_eq!(
        envelope(&first),
        json!({"op": "change", "pos": [from_msgpack.0, from_msgpack.1, from_msgpack.2],
               "ts": first["ts"], "workspace": "acme", "record": "r1", "lists": ["deals"],
               "kind": "insert"})
    );
    assert!(
        first["ts"].as_u64().unwrap() > 1_600_000_000_000,
        "ts is in ms"
    );
    // Absent fields are omitted, not null.
    assert_eq!(
        envelope(&second)
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["op", "pos", "ts", "workspace"]
    );
}
