//! Clients that do not keep up: one that stops reading is closed with 4008
//! once it holds its outbound budget, while the others keep receiving
//! everything; one that never reads again has its connection cut; one that
//! stops answering pings is dropped after the idle timeout, while one that
//! answers stays.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::Instant;

const BUDGET: usize = 64 * 1024;

/// Reads changes until one of kind `end`; answers their positions.
async fn read_until_end(mut client: Client) -> (Client, Vec<Pos>) {
    let mut positions = Vec::new();
    loop {
        let change = client.next_change().await;
        positions.push(pos_of(&change));
        if change["kind"] == "end" {
            return (client, positions);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4008_and_others_get_everything() {
    let node = Node::start(|c| c.limits.outbound_budget_bytes = BUDGET).await;
    let interests = json!([{"workspace": "w"}]);

    // The slow client never reads; a small receive buffer makes it fill up
    // after little data instead of the several MB loopback allows.
    let options = ConnectOptions {
        recv_buffer: Some(4096),
    };
    let mut slow = Client::connect_with(&node, Some(Wire::Json.protocol()), options).await;
    slow.hello(&token_all(), None).await;
    slow.subscribe(1, interests.clone()).await;
    let mut fast = Client::connect_hello(&node, Wire::MsgPack).await;
    fast.subscribe(1, interests.clone()).await;
    let fast = tokio::spawn(read_until_end(fast));

    // Ten changes of ~1 KiB a request: well under the budget per burst, so
    // only a client that does not read can reach it.
    let payload = "x".repeat(1000);
    let batch = json!(vec![json!({"workspace": "w", "data": payload}); 10]);
    let mut published = Vec::new();
    let started = Instant::now();
    let mut sent_bytes = 0usize;
    while node.metric("ripple_slow_closes_total").await < 1.0 {
        assert!(
            sent_bytes < 64 << 20 && started.elapsed() < Duration::from_secs(60),
            "the slow client was not closed after {sent_bytes} bytes"
        );
        published.extend(node.publish(batch.clone()).await);
        sent_bytes += 10 * 1000;
    }
    println!("the slow client was closed after {sent_bytes} bytes of changes");

    // The slow client, reading again at once (before the node would cut
    // its connection), gets what was queued for it in order and with no
    // gap, then the close with 4008.
    let mut queued = Vec::new();
    let ended = loop {
        match slow.next_within(WAIT).await {
            Ok((message, _)) => queued.push(pos_of(&message)),
            Err(ended) => break ended,
        }
    };
    assert_eq!(ended.code(), Some(4008), "closed as too slow: {ended:?}");
    assert!(!queued.is_empty() && queued.len() < published.len());
    assert_eq!(queued, published[..queued.len()], "a prefix, no gap");

    // The fast client got every change, in order, and goes on receiving.
    published.push(
        node.publish_one(json!({"workspace": "w", "kind": "end"}))
            .await,
    );
    let (fast, received) = tokio::time::timeout(WAIT * 3, fast)
        .await
        .expect("fast client timed out")
        .unwrap();
    assert_eq!(received, published, "the fast client lost nothing");

    assert_eq!(node.metric("ripple_slow_closes_total").await, 1.0);
    eventually("the slow connection to be gone", WAIT, || async {
        node.metric("ripple_connections").await == 1.0
    })
    .await;
    drop(fast);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_again_has_its_connection_cut() {
    let node = Node::start(|c| c.limits.outbound_budget_bytes = BUDGET).await;
    let options = ConnectOptions {
        recv_buffer: Some(4096),
    };
    let mut stuck = Client::connect_with(&node, Some(Wire::Json.protocol()), options).await;
    stuck.hello(&token_all(), None).await;
    stuck.subscribe(1, json!([{"workspace": "w"}])).await;

    let payload = "x".repeat(1000);
    let batch = json!(vec![json!({"workspace": "w", "data": payload}); 10]);
    let started = Instant::now();
    while node.metric("ripple_slow_closes_total").await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the stuck client was not closed"
        );
        node.publish(batch.clone()).await;
    }

    // Its session cannot write the 4008 close (the socket is full), so it
    // cannot end by itself: the node cuts the connection a few seconds on,
    // and the session is gone without the client reading a byte.
    let closed_at = Instant::now();
    eventually(
        "the stuck connection to be cut",
        Duration::from_secs(10),
        || async { node.metric("ripple_connections").await == 0.0 },
    )
    .await;
    assert!(
        closed_at.elapsed() >= Duration::from_secs(2),
        "cut only after the grace a slow client gets to go by itself"
    );
    assert_eq!(node.metric("ripple_sessions").await, 0.0);

    // What the client finds when it reads at last: what was buffered, then
    // the end of the connection.
    let (ended, read) = stuck.ended().await;
    println!("the stuck client read {read} messages, then {ended:?}");

    // The node goes on serving.
    let mut fresh = Client::connect_hello(&node, Wire::Json).await;
    fresh.subscribe(1, json!([{"workspace": "w"}])).await;
    let pos = node.publish_one(json!({"workspace": "w"})).await;
    assert_eq!(pos_of(&fresh.next_change().await), pos);
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_dropped() {
    let node = Node::start(|c| {
        c.limits.ping_interval_ms = 100;
        c.limits.idle_timeout_ms = 400;
    })
    .await;
    let interests = json!([{"workspace": "w"}]);

    // Says hello, then neither reads nor writes: pings go unanswered. The
    // node last heard from it no earlier than `silent_since`.
    let silent_since = Instant::now();
    let mut silent = Client::connect_hello(&node, Wire::Json).await;
    // Reads all the time, so it answers every ping with a pong.
    let mut awake = Client::connect_hello(&node, Wire::Json).await;
    awake.subscribe(1, interests).await;
    let awake = tokio::spawn(read_until_end(awake));
    assert_eq!(node.metric("ripple_connections").await, 2.0);

    eventually(
        "the silent client to be dropped",
        Duration::from_secs(5),
        || async { node.metric("ripple_connections").await == 1.0 },
    )
    .await;
    let dropped_after = silent_since.elapsed();
    assert!(
        dropped_after >= Duration::from_millis(400),
        "not before the idle timeout"
    );
    assert_eq!(node.metric("ripple_sessions").await, 1.0);
    // The server ended the silent connection.
    let (ended, _) = silent.ended().await;
    println!("silent client ended after {dropped_after:?}: {ended:?}");

    // The client that answered pings, with nothing else sent for as long,
    // is still there.
    let fence = node
        .publish_one(json!({"workspace": "w", "kind": "end"}))
        .await;
    let (_awake, received) = tokio::time::timeout(WAIT, awake).await.unwrap().unwrap();
    assert_eq!(received, [fence]);
}

#[tokio::test]
async fn a_full_node_refuses_connections_with_503_until_one_leaves() {
    let node = Node::start(|c| c.limits.max_connections = 2).await;
    let first = Client::connect_hello(&node, Wire::Json).await;
    let _second = Client::connect(&node, Wire::MsgPack).await;

    let refused = Client::try_connect(&node, Some(Wire::Json.protocol()), Default::default()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        Err(other) => panic!("expected a 503, got {other}"),
        Ok(_) => panic!("a third connection was accepted over max_connections = 2"),
    }
    assert!(node.metric("ripple_refused_total").await >= 1.0);

    first.close().await;
    eventually("a place to free up", WAIT, || async {
        node.metric("ripple_connections").await == 1.0
    })
    .await;
    let mut third = Client::connect_hello(&node, Wire::Json).await;
    third.subscribe(1, json!([{"workspace": "w"}])).await;
    let fence = node.publish_one(json!({"workspace": "w"})).await;
    third.expect_only(&fence).await;
}
