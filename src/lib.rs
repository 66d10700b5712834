//! Ripple: a clustered real-time server. Publishers push changes into any
//! node; every client holds a WebSocket to some node and receives, live, the
//! changes to the workspaces, lists and records it is interested in, and
//! exactly what it missed when it comes back.
//!
//! The path of a change: in through [`http`] (or a peer, through
//! [`cluster`]), positioned and kept in [`history`] by the [`router`],
//! matched against the [`interest`] index, and out through each
//! [`session`], encoded once per wire format by [`codec`].

pub mod auth;
pub mod change;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connection;
pub mod history;
pub mod http;
pub mod interest;
pub mod metrics;
pub mod router;
pub mod server;
pub mod session;
