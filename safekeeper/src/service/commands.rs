//! The simple-query commands the pg port understands, parsed from text.
//!
//! - `START_WAL_PUSH`: a proposer pushes WAL (our protocol, `super::push`).
//! - `IDENTIFY_SYSTEM`, `SHOW <name>`, `START_REPLICATION [SLOT s]
//!   [PHYSICAL] X/Y [TIMELINE n]`: what standard physical replication
//!   clients (pg_receivewal, a standby's walreceiver) send to a walsender;
//!   answered with the committed WAL (`super::replication`), and
//!   `TIMELINE_HISTORY n` (the history file of Postgres timeline n, which a
//!   standby asks for when it follows a promotion). A trailing
//!   `TERM n` is ours: a proposer of term n reading its donor's log
//!   (`compute_shim sync-safekeepers`), answered up to the flush LSN.
//!
//! Parsing is pure so it can be tested (and fuzzed) without a socket.

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::Term;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Empty,
    StartWalPush,
    IdentifySystem,
    Show(String),
    /// `READ_REPLICATION_SLOT name` (pg_receivewal --slot asks it first).
    ReadReplicationSlot(String),
    StartReplication(StartReplication),
    /// `TIMELINE_HISTORY n`.
    TimelineHistory(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartReplication {
    /// Accepted and shown in status; a safekeeper keeps no slots (its
    /// retention follows the page server's feedback, not replication clients).
    pub slot: Option<String>,
    pub start_lsn: Lsn,
    /// Postgres timeline asked for (1 if not given).
    pub pg_timeline: u32,
    /// `TERM n`: the reader is the elected proposer of term n, reading this
    /// safekeeper's log up to its flush LSN (the new term's log, committed
    /// or not), not only committed WAL.
    pub proposer_term: Option<Term>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("unsupported command \"{0}\": this port accepts START_WAL_PUSH, IDENTIFY_SYSTEM, SHOW, READ_REPLICATION_SLOT, TIMELINE_HISTORY and START_REPLICATION (physical)")]
    Unsupported(String),
    #[error("syntax error in {command}: {reason}")]
    Syntax { command: &'static str, reason: String },
}

/// Characters of an unknown command quoted back in the error.
const QUOTED_COMMAND_CHARS: usize = 80;

pub fn parse_command(query: &str) -> Result<Command, CommandError> {
    let command = query.trim().trim_end_matches(';').trim_end();
    let words = split_words(command);
    let Some(first) = words.first() else {
        return Ok(Command::Empty);
    };
    let keyword = first.to_ascii_uppercase();
    let rest = &words[1..];
    match keyword.as_str() {
        "START_WAL_PUSH" if rest.is_empty() => Ok(Command::StartWalPush),
        "IDENTIFY_SYSTEM" if rest.is_empty() => Ok(Command::IdentifySystem),
        "SHOW" => match rest {
            [name] => Ok(Command::Show(name.trim_matches('"').to_ascii_lowercase())),
            _ => Err(syntax("SHOW", "expected one parameter name")),
        },
        "READ_REPLICATION_SLOT" => match rest {
            [name] => Ok(Command::ReadReplicationSlot(name.trim_matches('"').to_string())),
            _ => Err(syntax("READ_REPLICATION_SLOT", "expected one slot name")),
        },
        "START_REPLICATION" => parse_start_replication(rest).map(Command::StartReplication),
        "TIMELINE_HISTORY" => match rest {
            [number] => number
                .parse::<u32>()
                .ok()
                .filter(|&timeline| timeline != 0)
                .map(Command::TimelineHistory)
                .ok_or_else(|| syntax("TIMELINE_HISTORY", format!("{:?} is not a timeline id", quote(number)))),
            _ => Err(syntax("TIMELINE_HISTORY", "expected one timeline id")),
        },
        _ => Err(CommandError::Unsupported(quote(command))),
    }
}

fn parse_start_replication(words: &[String]) -> Result<StartReplication, CommandError> {
    let mut words = words.iter().peekable();
    let mut slot = None;
    if words.peek().is_some_and(|w| w.eq_ignore_ascii_case("SLOT")) {
        words.next();
        let name = words.next().ok_or_else(|| syntax("START_REPLICATION", "SLOT needs a name"))?;
        slot = Some(name.trim_matches('"').to_string());
    }
    if words.peek().is_some_and(|w| w.eq_ignore_ascii_case("LOGICAL")) {
        return Err(syntax("START_REPLICATION", "logical replication is not served by a safekeeper"));
    }
    if words.peek().is_some_and(|w| w.eq_ignore_ascii_case("PHYSICAL")) {
        words.next();
    }
    let lsn_text = words.next().ok_or_else(|| syntax("START_REPLICATION", "a start LSN X/Y is required"))?;
    let start_lsn = lsn_text.parse::<Lsn>().map_err(|e| syntax("START_REPLICATION", e.to_string()))?;
    let mut number_after = |keyword: &str| -> Result<Option<u64>, CommandError> {
        if !words.peek().is_some_and(|w| w.eq_ignore_ascii_case(keyword)) {
            return Ok(None);
        }
        words.next();
        let number = words.next().ok_or_else(|| syntax("START_REPLICATION", format!("{keyword} needs a number")))?;
        let reason =
            || syntax("START_REPLICATION", format!("{} {:?} is not a number", keyword.to_lowercase(), quote(number)));
        number.parse().map(Some).map_err(|_| reason())
    };
    let pg_timeline = match number_after("TIMELINE")? {
        None => 1,
        Some(number) => u32::try_from(number)
            .map_err(|_| syntax("START_REPLICATION", format!("timeline {number} is out of range")))?,
    };
    let proposer_term = number_after("TERM")?.map(Term);
    if let Some(extra) = words.next() {
        return Err(syntax("START_REPLICATION", format!("unexpected {:?} after the start LSN", quote(extra))));
    }
    Ok(StartReplication { slot, start_lsn, pg_timeline, proposer_term })
}

fn syntax(command: &'static str, reason: impl Into<String>) -> CommandError {
    CommandError::Syntax { command, reason: reason.into() }
}

fn quote(text: &str) -> String {
    let mut quoted: String = text.chars().take(QUOTED_COMMAND_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push_str("...");
    }
    quoted
}

/// Whitespace-separated words; a double-quoted word may hold spaces.
fn split_words(text: &str) -> Vec<String> {
    let mut words = vec![];
    let mut word = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn start(slot: Option<&str>, lsn: u64, pg_timeline: u32) -> Command {
        let slot = slot.map(str::to_string);
        Command::StartReplication(StartReplication { slot, start_lsn: Lsn(lsn), pg_timeline, proposer_term: None })
    }

    #[test]
    fn parses_what_replication_clients_send() {
        assert_eq!(parse_command("IDENTIFY_SYSTEM"), Ok(Command::IdentifySystem));
        assert_eq!(parse_command("identify_system;"), Ok(Command::IdentifySystem));
        assert_eq!(parse_command("SHOW wal_segment_size"), Ok(Command::Show("wal_segment_size".into())));
        assert_eq!(parse_command("START_WAL_PUSH"), Ok(Command::StartWalPush));
        assert_eq!(parse_command("READ_REPLICATION_SLOT \"s1\""), Ok(Command::ReadReplicationSlot("s1".into())));
        assert_eq!(parse_command("  ;"), Ok(Command::Empty));
        // pg_receivewal
        assert_eq!(parse_command("START_REPLICATION 0/3000000 TIMELINE 1"), Ok(start(None, 0x300_0000, 1)));
        // a standby's walreceiver with primary_slot_name
        assert_eq!(
            parse_command("START_REPLICATION SLOT \"standby_1\" 1/AB000000 TIMELINE 1"),
            Ok(start(Some("standby_1"), 0x1_AB00_0000, 1))
        );
        assert_eq!(parse_command("START_REPLICATION PHYSICAL 0/10"), Ok(start(None, 0x10, 1)));
        // a sync proposer reading its donor
        let Ok(Command::StartReplication(donor)) = parse_command("START_REPLICATION PHYSICAL 0/10 TIMELINE 1 TERM 7")
        else {
            panic!("TERM is parsed")
        };
        assert_eq!(donor.proposer_term, Some(Term(7)));
        assert_eq!(donor.pg_timeline, 1);
    }

    #[test]
    fn refuses_with_reasons() {
        let syntax_reason = |q: &str| match parse_command(q) {
            Err(CommandError::Syntax { reason, .. }) => reason,
            other => panic!("{q}: {other:?}"),
        };
        assert!(syntax_reason("START_REPLICATION").contains("start LSN"));
        assert!(syntax_reason("START_REPLICATION 0/XYZ").contains("0/XYZ"));
        assert!(syntax_reason("START_REPLICATION SLOT s LOGICAL 0/1").contains("logical"));
        assert!(syntax_reason("START_REPLICATION 0/1 TIMELINE x").contains("not a number"));
        assert!(syntax_reason("START_REPLICATION 0/1 TIMELINE 1 extra").contains("extra"));
        assert!(syntax_reason("START_REPLICATION 0/1 TIMELINE 99999999999").contains("out of range"));
        assert!(syntax_reason("START_REPLICATION 0/1 TERM").contains("TERM needs a number"));
        assert!(syntax_reason("START_REPLICATION 0/1 TERM -3").contains("not a number"));
        assert!(syntax_reason("START_REPLICATION 0/1 TERM 3 TIMELINE 1").contains("TIMELINE"));
        assert!(syntax_reason("SHOW").contains("one parameter"));
        assert!(syntax_reason("TIMELINE_HISTORY").contains("one timeline id"));
        assert!(syntax_reason("TIMELINE_HISTORY 0").contains("not a timeline id"));
        assert!(syntax_reason("TIMELINE_HISTORY two").contains("not a timeline id"));
        assert_eq!(parse_command("TIMELINE_HISTORY 2"), Ok(Command::TimelineHistory(2)));
        assert!(matches!(parse_command("DROP TABLE x"), Err(CommandError::Unsupported(_))));
        assert!(matches!(parse_command("START_WAL_PUSH now"), Err(CommandError::Unsupported(_))));
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,200}") {
            let _ = parse_command(&text);
        }

        #[test]
        fn lsn_round_trips(lsn in any::<u64>(), tli in 1u32..) {
            let query = format!("START_REPLICATION {} TIMELINE {tli}", Lsn(lsn));
            prop_assert_eq!(parse_command(&query), Ok(start(None, lsn, tli)));
        }
    }
}
