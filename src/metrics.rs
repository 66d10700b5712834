//! Prometheus figures for `/metrics`.
//!
//! Counters are atomics, so the Router, the sessions and the HTTP handlers
//! update them from their own threads without going through an actor.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub sessions: IntGauge,
    pub subscriptions: IntGauge,
    pub changes_accepted: IntCounter,
    pub changes_applied: IntCounter,
    pub deliveries: IntCounter,
    pub catch_ups: IntCounter,
    pub catch_ups_unrecovered: IntCounter,
    pub catch_up_changes: IntCounter,
    pub slow_closes: IntCounter,
    pub refused: IntCounterVec,
    pub history_changes: IntGauge,
    pub history_oldest_age_seconds: IntGauge,
    pub history_trimmed: IntGauge,
    pub peer_up: IntGaugeVec,
    pub peer_last_seq: IntGaugeVec,
    pub peer_gaps: IntCounterVec,
    pub peer_repaired: IntCounterVec,
    pub peer_frames_refused: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    pub fn new(node: &str) -> Metrics {
        let labels = [("node".to_string(), node.to_string())]
            .into_iter()
            .collect();
        let r = Registry::new_custom(Some("ripple".into()), Some(labels)).expect("registry");
        Metrics {
            connections: gauge(&r, "connections", "Open WebSocket connections."),
            sessions: gauge(&r, "sessions", "Sessions that said hello."),
            subscriptions: gauge(&r, "subscriptions", "Interests held by sessions."),
            changes_accepted: counter(&r, "changes_accepted_total", "Changes accepted here."),
            changes_applied: counter(
                &r,
                "changes_applied_total",
                "Changes applied to history, from here and from peers.",
            ),
            deliveries: counter(&r, "deliveries_total", "Changes handed to sessions."),
            catch_ups: counter(&r, "catch_ups_total", "Resumes answered."),
            catch_ups_unrecovered: counter(
                &r,
                "catch_ups_unrecovered_total",
                "Resumes answered with recovered: false.",
            ),
            catch_up_changes: counter(&r, "catch_up_changes_total", "Changes sent as catch-up."),
            slow_closes: counter(&r, "slow_closes_total", "Sessions closed with 4008."),
            refused: counter_vec(
                &r,
                "refused_total",
                "Input refused, by reason.",
                &["reason"],
            ),
            history_changes: gauge(&r, "history_changes", "Changes held in history."),
            history_oldest_age_seconds: gauge(
                &r,
                "history_oldest_age_seconds",
                "Age of the oldest change in history.",
            ),
            history_trimmed: gauge(&r, "history_trimmed", "Changes trimmed from history."),
            peer_up: gauge_vec(
                &r,
                "peer_up",
                "1 while the link to a peer is up.",
                &["peer"],
            ),
            peer_last_seq: gauge_vec(
                &r,
                "origin_last_seq",
                "Last seq applied per origin.",
                &["origin"],
            ),
            peer_gaps: counter_vec(&r, "peer_gaps_total", "Gaps seen per origin.", &["origin"]),
            peer_repaired: counter_vec(
                &r,
                "peer_repaired_total",
                "Changes repaired per origin.",
                &["origin"],
            ),
            peer_frames_refused: counter_vec(
                &r,
                "peer_frames_refused_total",
                "Frames between nodes refused, by reason.",
                &["reason"],
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("utf-8 metrics")
    }
}
