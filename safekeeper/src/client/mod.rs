//! A client of the safekeeper HTTP API (docs/http-api.md), shared by the
//! page server stub and by peer recovery: [`api`] is the contract as a
//! client reads it, [`pull`] the requests (status, streamed WAL, feedback).

pub mod api;
pub mod pull;
