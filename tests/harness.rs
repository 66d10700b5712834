//! The test harness itself, so that multi-node tests can rely on it: a
//! cluster config of several nodes comes up, its nodes can be frozen,
//! thawed and restarted, and a change published on one node reaches a
//! client of another.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_cluster_comes_up_and_its_nodes_can_be_stopped_and_restarted() {
    let cluster = Cluster::new(2, |_| {});
    assert!(cluster
        .config
        .nodes
        .iter()
        .all(|n| n.bus.is_some() && n.repair.is_some()));
    let mut nodes = cluster.start_all().await;
    assert_eq!(nodes[0].health().await["node"], "n1");
    assert_eq!(nodes[1].health().await["node"], "n2");

    let mut client = Client::connect_hello(&nodes[1], Wire::Json).await;
    client.subscribe(1, json!([{"workspace": "w"}])).await;
    // The link between the nodes comes up in its own time: publish on n1
    // until a change of n1 reaches the client on n2.
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = loop {
        nodes[0].publish_one(json!({"workspace": "w"})).await;
        let wait = std::time::Duration::from_millis(200);
        if let Ok(Ok((change, _))) = tokio::time::timeout(wait, client.next_within(WAIT)).await {
            break pos_of(&change);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n1's changes never reached n2"
        );
    };
    assert_eq!(first.0, "n1");

    // A frozen node does not answer; thawed, it does again.
    nodes[0].stop();
    let frozen = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        reqwest::get(nodes[0].url("/healthz")),
    )
    .await;
    assert!(frozen.is_err(), "a SIGSTOPped node answered");
    nodes[0].cont();
    assert_eq!(nodes[0].health().await["status"], "ok");

    // A restarted node is a new epoch on the same ports.
    let epoch = nodes[1].health().await["epoch"].as_u64().unwrap();
    nodes[1].restart().await;
    let health = nodes[1].health().await;
    assert!(health["epoch"].as_u64().unwrap() > epoch, "{health}");
    assert!(nodes[1].pid() > 0);
}
