//! Proposer state machine (being written).
