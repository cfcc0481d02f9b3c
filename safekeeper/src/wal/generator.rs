//! Generator of valid PG15 WAL (tests, simulation, benchmarks). Filled in by the WAL task.
