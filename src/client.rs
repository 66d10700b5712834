//! Reconnecting client (coming).
