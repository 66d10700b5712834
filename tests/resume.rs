//! Resume on one node: a client that comes back with its cursor gets every
//! change it missed exactly once, in order, then the live ones with nothing
//! lost or repeated at the seam, even while changes keep being published
//! during the resume itself; `missed` counts the catch-up. When history no
//! longer holds what the client missed, the answer is `recovered: false`
//! with no catch-up.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use tokio::sync::watch;

fn cursor(pos: &Pos) -> Value {
    json!({ pos.0.clone(): [pos.1, pos.2] })
}

#[tokio::test]
async fn changes_missed_while_away_arrive_once_in_order_then_live() {
    let node = Node::start_default().await;
    let interests = json!([{"workspace": "w", "list": "l"}, {"workspace": "w", "record": "r"},
                           {"workspace": "v"}]);

    let mut client = Client::connect_hello(&node, Wire::Json).await;
    client.subscribe(1, interests.clone()).await;
    let seen = node
        .publish_one(json!({"workspace": "w", "lists": ["l"]}))
        .await;
    client.expect_only(&seen).await;
    client.close().await;

    let positions = node
        .publish(json!([
            {"workspace": "w", "lists": ["l"]},
            {"workspace": "v"},
            {"workspace": "w", "record": "other"},
            {"workspace": "w", "record": "r", "lists": ["l"]}, // matches twice, sent once
            {"workspace": "x", "record": "r", "lists": ["l"]},
            {"workspace": "v", "record": "r"},
            {"workspace": "w", "record": "r"},
        ]))
        .await;
    // In seq order across the two workspaces.
    let missed: Vec<Pos> = [0, 1, 3, 5, 6]
        .iter()
        .map(|&i| positions[i].clone())
        .collect();

    let mut client = Client::connect(&node, Wire::Json).await;
    let welcome = client
        .resume(&token_all(), cursor(&seen), interests.clone())
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["missed"], 5, "{welcome}");
    assert_eq!(welcome["node"], "n1");
    let last = positions.last().unwrap();
    assert_eq!(
        welcome["position"],
        cursor(last),
        "the node's current cursor"
    );
    let mut catch_up = Vec::new();
    for _ in 0..5 {
        catch_up.push(pos_of(&client.next_change().await));
    }
    assert_eq!(catch_up, missed);
    // Then live, subscribed by the resume.
    let live = node
        .publish_one(json!({"workspace": "w", "record": "r"}))
        .await;
    client.expect_only(&live).await;
    client.close().await;

    // The same resume in MessagePack, from the same cursor, now misses six.
    let mut client = Client::connect(&node, Wire::MsgPack).await;
    let welcome = client
        .resume(&token_all(), cursor(&seen), interests.clone())
        .await;
    assert_eq!(welcome["recovered"], true);
    assert_eq!(welcome["missed"], 6);
    let fence = node
        .publish_one(json!({"workspace": "w", "lists": ["l"]}))
        .await;
    let mut expected = missed;
    expected.extend([live, fence.clone()]);
    assert_eq!(client.positions_until(&fence).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_during_a_stream_of_publishes_sees_every_change_once() {
    const TOTAL: u64 = 600;
    const BATCH: u64 = 3;
    let node = Arc::new(Node::start_default().await);
    let interests = json!([{"workspace": "w"}]);

    let mut client = Client::connect_hello(&node, Wire::MsgPack).await;
    client.subscribe(1, interests.clone()).await;
    let start = node.publish_one(json!({"workspace": "w"})).await;
    client.expect_only(&start).await;
    client.close().await;

    // The publisher hammers while the client comes and goes. Every third
    // change is in another workspace, so the client's seqs have holes that
    // are not gaps.
    let (progress_tx, mut progress) = watch::channel(0u64);
    let publisher = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut wanted = Vec::new();
            for batch in 0..TOTAL / BATCH {
                let changes: Vec<Value> = (0..BATCH)
                    .map(|i| {
                        let workspace = if i == 2 { "x" } else { "w" };
                        json!({"workspace": workspace, "data": batch * BATCH + i})
                    })
                    .collect();
                let positions = node.publish(Value::Array(changes)).await;
                wanted.extend(positions.into_iter().take(2));
                progress_tx.send_replace((batch + 1) * BATCH);
            }
            wanted
        })
    };

    // Come back mid-stream, read a little, drop the connection, come back
    // again: each time from the last position actually read.
    let mut received: Vec<Pos> = Vec::new();
    let mut last = start.clone();
    for (round, after) in [(0, 60), (1, 200), (2, 400)] {
        progress.wait_for(|&n| n >= after).await.unwrap();
        let wire = if round % 2 == 0 {
            Wire::Json
        } else {
            Wire::MsgPack
        };
        let mut client = Client::connect(&node, wire).await;
        let welcome = client
            .resume(&token_all(), cursor(&last), interests.clone())
            .await;
        assert_eq!(welcome["recovered"], true, "{welcome}");
        let missed = welcome["missed"].as_u64().unwrap();
        assert!(missed > 0, "changes were published while away");
        println!(
            "round {round}: missed {missed} published {}",
            *progress.borrow()
        );
        // Read the catch-up and some live changes; leave in the middle of
        // the last round's catch-up.
        let read = if round == 2 { missed / 2 } else { missed + 20 };
        for _ in 0..read {
            let change = client.next_change().await;
            last = pos_of(&change);
            received.push(last.clone());
        }
        drop(client);
    }

    let wanted = publisher.await.unwrap();
    let mut client = Client::connect(&node, Wire::Json).await;
    let welcome = client
        .resume(&token_all(), cursor(&last), interests.clone())
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    let fence = node.publish_one(json!({"workspace": "w"})).await;
    let rest = client.positions_until(&fence).await;
    assert_eq!(
        welcome["missed"].as_u64().unwrap() as usize,
        rest.len() - 1,
        "`missed` counts the catch-up: everything but the live fence"
    );
    received.extend(rest);

    let mut expected = wanted;
    expected.push(fence);
    assert_eq!(received.len(), expected.len(), "each change exactly once");
    assert_eq!(
        received, expected,
        "every change once, in seq order, no gap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_racing_the_publisher_has_no_gap_or_repeat_at_the_seam() {
    // Many short resumes, each started while a publish is in flight: the
    // seam between catch-up and live is crossed under load every time.
    let node = Arc::new(Node::start_default().await);
    let interests = json!([{"workspace": "w"}]);
    let mut last = node.publish_one(json!({"workspace": "w"})).await;
    let mut received = vec![last.clone()];

    let (stop_tx, stop) = watch::channel(false);
    let publisher = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut published = Vec::new();
            while !*stop.borrow() {
                published.extend(node.publish(json!([{"workspace": "w"}])).await);
            }
            published
        })
    };
    for round in 0..20 {
        let wire = if round % 2 == 0 {
            Wire::Json
        } else {
            Wire::MsgPack
        };
        let mut client = Client::connect(&node, wire).await;
        let welcome = client
            .resume(&token_all(), cursor(&last), interests.clone())
            .await;
        assert_eq!(welcome["recovered"], true);
        // The catch-up and at least one live change.
        let missed = welcome["missed"].as_u64().unwrap();
        for _ in 0..missed + 1 {
            last = pos_of(&client.next_change().await);
            received.push(last.clone());
        }
        drop(client);
    }
    stop_tx.send_replace(true);
    let mut published = publisher.await.unwrap();

    let mut client = Client::connect(&node, Wire::Json).await;
    client.resume(&token_all(), cursor(&last), interests).await;
    let fence = node.publish_one(json!({"workspace": "w"})).await;
    received.extend(client.positions_until(&fence).await);

    let mut expected = vec![received[0].clone()];
    expected.append(&mut published);
    expected.push(fence);
    assert_eq!(received, expected);
}

#[tokio::test]
async fn trimmed_history_answers_recovered_false_without_catch_up() {
    let node = Node::start(|c| c.history.max_changes = 5).await;
    let interests = json!([{"workspace": "w"}]);
    let seen = node.publish_one(json!({"workspace": "w"})).await;
    // Ten more: the change after `seen` is trimmed.
    let positions = node
        .publish(json!(vec![json!({"workspace": "w"}); 10]))
        .await;
    assert_eq!(node.health().await["history"], 5);

    let mut client = Client::connect(&node, Wire::Json).await;
    let welcome = client
        .resume(&token_all(), cursor(&seen), interests.clone())
        .await;
    assert_eq!(welcome["recovered"], false, "{welcome}");
    assert_eq!(welcome["missed"], 0);
    assert_eq!(welcome["position"], cursor(positions.last().unwrap()));
    // No catch-up, but the interests are subscribed: live follows.
    let fence = node.publish_one(json!({"workspace": "w"})).await;
    client.expect_only(&fence).await;

    // A cursor still inside history recovers.
    let mut client = Client::connect(&node, Wire::MsgPack).await;
    let inside = &positions[positions.len() - 2];
    let welcome = client
        .resume(&token_all(), cursor(inside), interests.clone())
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["missed"], 2);

    // An epoch the node never had cannot be proven complete either.
    let mut client = Client::connect(&node, Wire::Json).await;
    let old_epoch = json!({"n1": [seen.1 - 1000, 3]});
    let welcome = client.resume(&token_all(), old_epoch, interests).await;
    assert_eq!(welcome["recovered"], false, "{welcome}");
    assert_eq!(welcome["missed"], 0);
    assert_eq!(node.metric("ripple_catch_ups_unrecovered_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_wait_behind_a_long_catch_up() {
    // A catch-up of several MB is written in chunks over many turns of the
    // session; live changes published meanwhile must queue behind it.
    let node = Arc::new(Node::start_default().await);
    let interests = json!([{"workspace": "w"}]);
    let seen = node.publish_one(json!({"workspace": "w"})).await;
    let payload = "y".repeat(1000);
    let mut expected = Vec::new();
    for _ in 0..40 {
        let batch = vec![json!({"workspace": "w", "data": payload}); 100];
        expected.extend(node.publish(json!(batch)).await);
    }

    let (stop_tx, stop) = watch::channel(false);
    let publisher = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut published = Vec::new();
            while !*stop.borrow() {
                published.extend(
                    node.publish(json!({"workspace": "w", "kind": "live"}))
                        .await,
                );
            }
            published
        })
    };
    let mut client = Client::connect(&node, Wire::MsgPack).await;
    let welcome = client.resume(&token_all(), cursor(&seen), interests).await;
    assert_eq!(welcome["recovered"], true);
    let missed = welcome["missed"].as_u64().unwrap() as usize;
    assert!(
        missed >= expected.len(),
        "the catch-up holds the 4000 missed"
    );

    let mut received = Vec::new();
    let mut live_seen = 0;
    // Until some live changes came through after the catch-up.
    while received.len() < missed || live_seen < 20 {
        let change = client.next_change().await;
        if received.len() >= missed {
            assert_eq!(change["kind"], "live");
            live_seen += 1;
        }
        received.push(pos_of(&change));
    }
    stop_tx.send_replace(true);
    let published = publisher.await.unwrap();
    let fence = node.publish_one(json!({"workspace": "w"})).await;
    received.extend(client.positions_until(&fence).await);

    expected.extend(published);
    expected.push(fence);
    assert_eq!(received.len(), expected.len(), "each change exactly once");
    assert_eq!(received, expected, "catch-up, then live, in seq order");
}

#[tokio::test]
async fn a_client_that_starts_from_welcome_position_misses_nothing() {
    // The usual life of a client: its cursor starts at `welcome.position`
    // (before anything was published here) and moves with each change.
    let node = Node::start_default().await;
    let interests = json!([{"workspace": "w"}]);
    let mut client = Client::connect(&node, Wire::Json).await;
    let welcome = client.hello(&token_all(), None).await;
    let epoch = node.health().await["epoch"].as_u64().unwrap();
    assert_eq!(welcome["position"], json!({"n1": [epoch, 0]}));
    assert_eq!(welcome["recovered"], true);
    assert_eq!(welcome["missed"], 0);
    client.close().await;

    let positions = node
        .publish(json!([{"workspace": "w"}, {"workspace": "w"}]))
        .await;
    let mut client = Client::connect(&node, Wire::MsgPack).await;
    let welcome = client
        .resume(&token_all(), welcome["position"].clone(), interests.clone())
        .await;
    assert_eq!(welcome["recovered"], true);
    assert_eq!(welcome["missed"], 2);
    assert_eq!(client.positions_until(&positions[1]).await, positions);

    // A cursor that does not name this origin at all: all of it is missed.
    let mut client = Client::connect(&node, Wire::Json).await;
    let welcome = client.resume(&token_all(), json!({}), interests).await;
    assert_eq!(welcome["recovered"], true);
    assert_eq!(welcome["missed"], 2);
    assert_eq!(client.positions_until(&positions[1]).await, positions);
}
