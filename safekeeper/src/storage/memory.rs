//! In-memory storage.
