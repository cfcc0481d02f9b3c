//! The PostgreSQL 15 WAL format: page headers, records, an incremental decoder
//! and (for tests and simulation) a generator of valid WAL.

pub mod decoder;
pub mod format;
// Valid WAL for tests and the simulation, not for production code.
#[cfg(any(test, feature = "testing"))]
pub mod generator;

pub use decoder::{DecodeStep, DecodedRecord, WalDecodeError, WalDecoder};
