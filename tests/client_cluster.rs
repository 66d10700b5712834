//! The Rust client in a cluster: when its node dies it moves to the next
//! node of its list and resumes there exactly, with nothing lost and nothing
//! repeated.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use ripple::client::{Client, ClientConfig, Event, TokenSource};
use ripple::interest::Interest;
use serde_json::json;
use tokio::time::timeout;

/// Waits until every node reports all its peers up.
async fn linked(nodes: &[Node]) {
    for node in nodes {
        eventually("the peer links to come up", WAIT, || async {
            let health = node.health().await;
            let peers = health["peers"].as_array().cloned().unwrap_or_default();
            !peers.is_empty() && peers.iter().all(|p| p["up"] == true)
        })
        .await;
    }
}

/// Reads events until `want` changes arrived; answers them by position and
/// the welcomes seen on the way.
async fn collect(client: &mut Client, want: usize) -> (Vec<Pos>, Vec<(String, bool)>) {
    let mut changes = Vec::new();
    let mut welcomes = Vec::new();
    while changes.len() < want {
        let event = timeout(WAIT, client.next())
            .await
            .expect("timed out waiting for the client")
            .expect("client stopped");
        match event {
            Event::Change(c) => changes.push((c.pos.origin.to_string(), c.pos.epoch, c.pos.seq)),
            Event::Welcome {
                node, recovered, ..
            } => welcomes.push((node, recovered)),
            Event::Reset => panic!("the resume was not recovered"),
            _ => {}
        }
    }
    (changes, welcomes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_to_another_node_when_its_node_dies_and_resumes_exactly() {
    let cluster = Cluster::new(3, |c| c.limits.ping_interval_ms = 500);
    let mut nodes = cluster.start_all().await;
    linked(&nodes).await;

    let urls = nodes.iter().map(|n| n.ws_url()).collect();
    let mut config = ClientConfig::new(urls, TokenSource::Fixed(token_all()));
    config.interests = vec![Interest::workspace("w")];
    config.backoff.max = Duration::from_millis(300);
    let mut client = Client::connect(config).expect("client starts");
    loop {
        let event = timeout(WAIT, client.next())
            .await
            .expect("subscribed in time");
        if let Some(Event::Subscribed { .. }) = event {
            break;
        }
    }

    let mut published: Vec<Pos> = Vec::new();
    for i in 0..10 {
        published.push(
            nodes[1 + i % 2]
                .publish_one(json!({"workspace": "w"}))
                .await,
        );
    }
    let (before, _) = collect(&mut client, 10).await;

    // Its node (n1, the first of its list) dies while n2 and n3 go on.
    nodes[0].kill();
    for i in 0..20 {
        published.push(
            nodes[1 + i % 2]
                .publish_one(json!({"workspace": "w"}))
                .await,
        );
    }
    let (after, welcomes) = collect(&mut client, 20).await;
    assert_eq!(
        welcomes.first().map(|w| w.1),
        Some(true),
        "resumed: {welcomes:?}"
    );
    assert_ne!(welcomes[0].0, "n1", "moved to a live node");

    // Then live, on its new node: a fence published after everything.
    let fence = nodes[2].publish_one(json!({"workspace": "w"})).await;
    published.push(fence.clone());
    let (live, _) = collect(&mut client, 1).await;
    assert_eq!(live, vec![fence]);

    let received: Vec<Pos> = before.into_iter().chain(after).chain(live).collect();
    let mut sorted_received = received.clone();
    sorted_received.sort();
    published.sort();
    assert_eq!(
        sorted_received, published,
        "every change once, nothing else"
    );
    let mut last: HashMap<String, u64> = HashMap::new();
    for (origin, _, seq) in received {
        let previous = last.insert(origin.clone(), seq).unwrap_or(0);
        assert!(
            seq > previous,
            "per-origin order: {origin} {seq} after {previous}"
        );
    }
}
