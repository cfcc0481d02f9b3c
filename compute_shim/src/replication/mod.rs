//! Postgres replication client (being written).
