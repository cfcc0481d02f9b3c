//! The Postgres v3 wire protocol's framing, written once and without I/O:
//! the safekeeper's pg port (server side), the shim's replication and
//! safekeeper clients, and the tests' blocking client all frame with it.
//! Sockets, timeouts and what a session means stay with each caller.
//!
//! - [`tag`]: message type bytes, frontend and backend.
//! - [`frame`]: a tagged frame (tag, length word, body): decoding with the
//!   declared length checked before the body is buffered, encoding.
//! - [`body`]: bounds-checked reads from a message body.
//! - [`startup`]: the untagged first packet (protocol 3.0, SSL/GSS/cancel).
//! - [`error_fields`]: ErrorResponse / NoticeResponse fields.

pub mod body;
pub mod error_fields;
pub mod frame;
pub mod startup;
pub mod tag;
