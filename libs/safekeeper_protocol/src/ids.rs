//! Identity newtypes: terms, node ids, tenant/timeline ids, Postgres system ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A consensus term (Raft's term). Zero means "never voted".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Term(pub u64);

impl Term {
    /// The highest term anyone may use (the largest signed 64-bit value:
    /// what Postgres's bigint and every JSON reader hold exactly). An
    /// acceptor refuses a message in a higher term as a protocol error and
    /// a proposer treats a safekeeper reporting one as broken, so no term
    /// arithmetic can overflow and no input can make a process panic.
    pub const MAX: Term = Term(i64::MAX as u64);

    /// The term after this one; `None` at [`Term::MAX`] (terms exhausted).
    pub fn next(self) -> Option<Term> {
        (self < Term::MAX).then(|| Term(self.0 + 1))
    }
}

/// A safekeeper's node id, fixed at data directory creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// Postgres's database system identifier (from `IDENTIFY_SYSTEM` / the WAL long page header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SystemId(pub u64);

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: expected 32 hex characters")]
pub struct IdParseError {
    pub kind: &'static str,
    pub input: String,
}

macro_rules! hex_id {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("A 128-bit ", $kind, ", written as 32 lower-case hex characters.")]
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; 16]);

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(input: &str) -> Result<Self, IdParseError> {
                parse_hex16(input).map($name).ok_or_else(|| IdParseError { kind: $kind, input: input.to_string() })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(TenantId, "tenant id");
hex_id!(TimelineId, "timeline id");

fn parse_hex16(input: &str) -> Option<[u8; 16]> {
    if input.len() != 32 || !input.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&input[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Which Postgres cluster and which of our timelines a message belongs to.
/// Carried by every proposer message so WAL of two clusters can never mix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId {
    pub system_id: SystemId,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids_round_trip_and_reject_garbage() {
        let text = "0123456789abcdef0123456789ABCDEF";
        let id: TenantId = text.parse().unwrap();
        assert_eq!(id.to_string(), text.to_lowercase());
        for bad in ["", "0123", "0123456789abcdef0123456789abcdeg", "0123456789abcdef0123456789abcdef0"] {
            let err = bad.parse::<TimelineId>().unwrap_err();
            assert!(err.to_string().contains("timeline id"));
        }
    }
}
