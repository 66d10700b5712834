//! Who may connect and what they may read: a session without a good token,
//! or without `hello` in time, is closed with 4001; an interest outside the
//! token's workspaces is refused with `forbidden` while the connection and
//! its other interests stay.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::time::Instant;

fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now_secs() -> u64 {
    ripple::change::now_ms() / 1000
}

/// Sends `hello` and expects the session to be closed with 4001.
async fn refused(node: &Node, wire: Wire, hello: Value) -> String {
    let mut client = Client::connect(node, wire).await;
    client.send(hello).await;
    client.expect_close(4001).await
}

#[tokio::test]
async fn bad_tokens_are_closed_with_4001() {
    let node = Node::start_default().await;
    let in_an_hour = now_secs() + 3600;

    // Missing or empty: no token at all.
    for wire in [Wire::Json, Wire::MsgPack] {
        // Regression: a hello without a token was closed 4002 (malformed)
        // instead of 4001 (no token).
        refused(&node, wire, json!({"op": "hello"})).await;
        refused(&node, wire, json!({"op": "hello", "token": ""})).await;
    }
    // Not a JWT.
    let reason = refused(
        &node,
        Wire::Json,
        json!({"op": "hello", "token": "not.a.jwt"}),
    )
    .await;
    assert!(reason.contains("token"), "the reason says why: {reason}");
    // A JWT without the `workspaces` claim.
    let no_claim = sign(&json!({"exp": in_an_hour}), JWT_SECRET);
    refused(&node, Wire::Json, json!({"op": "hello", "token": no_claim})).await;
    // Signed with another secret.
    let forged = sign(
        &json!({"workspaces": ["*"], "exp": in_an_hour}),
        "another-secret",
    );
    let reason = refused(
        &node,
        Wire::MsgPack,
        json!({"op": "hello", "token": forged}),
    )
    .await;
    assert!(reason.contains("signature"), "{reason}");
    // Expired.
    let expired = sign(
        &json!({"workspaces": ["*"], "exp": now_secs() - 10}),
        JWT_SECRET,
    );
    let reason = refused(&node, Wire::Json, json!({"op": "hello", "token": expired})).await;
    assert!(reason.contains("expired"), "{reason}");

    // Refused hellos leave nothing behind, and the node serves the next one.
    let mut client = Client::connect_hello(&node, Wire::Json).await;
    client.subscribe(1, json!([{"workspace": "w"}])).await;
    let fence = node.publish_one(json!({"workspace": "w"})).await;
    client.expect_only(&fence).await;
    assert_eq!(node.metric("ripple_sessions").await, 1.0);
}

#[tokio::test]
async fn a_session_is_closed_with_4001_when_its_token_expires() {
    let node = Node::start_default().await;
    let mut client = Client::connect(&node, Wire::Json).await;
    let short = sign(
        &json!({"workspaces": ["*"], "exp": now_secs() + 1}),
        JWT_SECRET,
    );
    client.hello(&short, None).await;
    client.subscribe(1, json!([{"workspace": "w"}])).await;

    let started = Instant::now();
    let reason = client.expect_close(4001).await;
    assert!(reason.contains("expired"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed at expiry"
    );
}

#[tokio::test]
async fn no_hello_in_time_is_closed_with_4001() {
    let node = Node::start(|c| c.limits.hello_timeout_ms = 300).await;
    let started = Instant::now();
    let mut silent = Client::connect(&node, Wire::Json).await;
    // A client that did say hello in time is not affected.
    let mut polite = Client::connect_hello(&node, Wire::MsgPack).await;
    polite.subscribe(1, json!([{"workspace": "w"}])).await;

    let reason = silent.expect_close(4001).await;
    assert!(reason.contains("hello"), "{reason}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );

    let fence = node.publish_one(json!({"workspace": "w"})).await;
    polite.expect_only(&fence).await;
}

#[tokio::test]
async fn workspaces_outside_the_token_are_forbidden_and_the_rest_stands() {
    let node = Node::start_default().await;
    let mut client = Client::connect(&node, Wire::Json).await;
    client.hello(&token(&["acme", "beta"]), None).await;
    client
        .subscribe(1, json!([{"workspace": "acme", "list": "l"}]))
        .await;

    // One forbidden interest refuses the whole request.
    client
        .send(json!({"op": "subscribe", "id": 2, "interests": [
            {"workspace": "acme", "record": "r"}, {"workspace": "secret"}]}))
        .await;
    let error = client.reply(2).await;
    assert_eq!(error["op"], "error");
    assert_eq!(error["code"], "forbidden");
    assert_eq!(error["interests"], json!([{"workspace": "secret"}]));
    assert!(
        error["message"].as_str().unwrap().contains("secret"),
        "{error}"
    );

    // The connection stays open and takes further requests.
    client.subscribe(3, json!([{"workspace": "beta"}])).await;

    let positions = node
        .publish(json!([
            {"workspace": "acme", "record": "r"},   // refused with request 2
            {"workspace": "secret"},                // never granted
            {"workspace": "beta"},
            {"workspace": "acme", "lists": ["l"]},  // fence
        ]))
        .await;
    assert_eq!(client.positions_until(&positions[3]).await, positions[2..]);
    assert!(node.metric("ripple_refused_total").await >= 1.0);
}

#[tokio::test]
async fn forbidden_resume_interests_are_refused_and_the_allowed_ones_resume() {
    let node = Node::start_default().await;
    let before = node
        .publish(json!([{"workspace": "acme"}, {"workspace": "secret"}, {"workspace": "acme"}]))
        .await;

    let mut client = Client::connect(&node, Wire::MsgPack).await;
    client
        .send(json!({"op": "hello", "token": token(&["acme"]), "resume": {
            "cursor": {}, "interests": [{"workspace": "acme"}, {"workspace": "secret"}]}}))
        .await;
    // The refusal comes first, without id, listing the refused interests.
    let error = client.next().await;
    assert_eq!(error["op"], "error", "{error}");
    assert_eq!(error["code"], "forbidden");
    assert!(
        error.get("id").is_none(),
        "no request id to answer: {error}"
    );
    assert_eq!(error["interests"], json!([{"workspace": "secret"}]));
    let welcome = client.next().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    assert_eq!(welcome["recovered"], true);

    // The allowed interest resumes with its catch-up, then goes on live.
    assert_eq!(welcome["missed"], 2, "{welcome}");
    let live = node
        .publish(json!([{"workspace": "secret"}, {"workspace": "acme"}]))
        .await;
    let expected = vec![before[0].clone(), before[2].clone(), live[1].clone()];
    assert_eq!(client.positions_until(&live[1]).await, expected);
}
