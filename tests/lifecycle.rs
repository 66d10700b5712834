//! A node's life as its operator sees it: `/healthz` and `/metrics` answer
//! and track what happens, and SIGTERM sends every session elsewhere with
//! 4009 before the process exits cleanly.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn healthz_and_metrics_answer_and_follow_publishes() {
    let node = Node::start_default().await;

    let health = node.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["node"], "n1");
    assert_eq!(health["seq"], 0);
    let epoch = health["epoch"].as_u64().expect("epoch is a number");
    assert!(epoch > 0);

    let mut client = Client::connect_hello(&node, Wire::Json).await;
    client.subscribe(1, json!([{"workspace": "w"}])).await;
    let positions = node
        .publish(json!([{"workspace": "w"}, {"workspace": "w"}, {"workspace": "other"}]))
        .await;
    let expected: Vec<Pos> = (1..=3).map(|seq| ("n1".to_string(), epoch, seq)).collect();
    assert_eq!(positions, expected);
    assert_eq!(client.positions_until(&positions[1]).await, positions[..2]);

    let health = node.health().await;
    assert_eq!(health["seq"], 3);
    assert_eq!(health["epoch"], epoch);
    assert_eq!(health["position"], json!({"n1": [epoch, 3]}));
    assert_eq!(health["sessions"], 1);

    let (status, metrics) = node.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric_value(&metrics, "ripple_changes_accepted_total"), 3.0);
    assert_eq!(metric_value(&metrics, "ripple_deliveries_total"), 2.0);
    assert_eq!(metric_value(&metrics, "ripple_connections"), 1.0);
    assert_eq!(metric_value(&metrics, "ripple_sessions"), 1.0);
    assert_eq!(metric_value(&metrics, "ripple_subscriptions"), 1.0);
    assert!(
        metrics.contains("node=\"n1\""),
        "metrics carry the node label"
    );

    client.close().await;
    eventually("the connection gauge to fall to 0", WAIT, || async {
        node.metric("ripple_connections").await == 0.0
            && node.metric("ripple_sessions").await == 0.0
    })
    .await;
}

#[tokio::test]
async fn sigterm_closes_every_session_with_4009_then_exits() {
    let mut node = Node::start_default().await;
    let mut json_client = Client::connect_hello(&node, Wire::Json).await;
    let mut msgpack_client = Client::connect_hello(&node, Wire::MsgPack).await;
    json_client.subscribe(1, json!([{"workspace": "w"}])).await;
    msgpack_client
        .subscribe(1, json!([{"workspace": "w"}]))
        .await;

    node.terminate();

    json_client.expect_close(4009).await;
    msgpack_client.expect_close(4009).await;
    let status = node.wait_exit(WAIT).await;
    assert!(
        status.success(),
        "a SIGTERM'd node exits cleanly, got {status}"
    );
}

#[tokio::test]
async fn a_hello_after_sigterm_is_sent_away_with_4009() {
    let mut node = Node::start_default().await;
    let mut late = Client::connect(&node, Wire::Json).await;

    node.terminate();
    eventually("the node to send its sessions away", WAIT, || async {
        std::fs::read_to_string(node.log_path())
            .unwrap_or_default()
            .contains("sessions told to go elsewhere")
    })
    .await;

    // Regression: a hello that came after the sessions were sent away was
    // welcomed by the node going away, and held its shutdown.
    late.send(json!({"op": "hello", "token": token_all()}))
        .await;
    late.expect_close(4009).await;
    let status = node.wait_exit(WAIT).await;
    assert!(status.success(), "{status}");
}
