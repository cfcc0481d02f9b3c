//! The safekeeper HTTP API (docs/http-api.md), shared by the server
//! (safekeeper's service), peer recovery, the page server stub and the
//! tests: [`api`] is the contract (documents, header names), [`pull`] the
//! client's requests (status, streamed WAL, feedback).

pub mod api;
pub mod pull;
