//! The connection in command mode: startup, simple queries and the
//! replication commands a physical receiver needs.

use net::stream::{ReadHalf, WriteHalf};
use postgres_protocol::message::frontend;
use postgres_wal::lsn::{Lsn, PgTimelineId};
use postgres_wal::timeline_history::PgTimelineHistory;
use postgres_wal::wal::format::PG_FIRST_TIMELINE_ID;
use safekeeper_protocol::ids::Term;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::debug;

use super::auth::{self, AuthMethod};
use super::config::ReplicationConfig;
use super::stream::ReplicationStream;
use super::wire::{parse_data_row, parse_row_description, parse_server_error, tag, FrameReader, FrameWriter};
use super::ReplicationError;

/// SQLSTATE duplicate_object: CREATE_REPLICATION_SLOT of an existing slot.
const SQLSTATE_DUPLICATE_OBJECT: &str = "42710";
/// Postgres's NAMEDATALEN - 1.
const MAX_SLOT_NAME_BYTES: usize = 63;

/// What IDENTIFY_SYSTEM reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: u64,
    pub timeline: PgTimelineId,
    /// The server's current flush position.
    pub xlogpos: Lsn,
    /// None on a physical connection.
    pub dbname: Option<String>,
}

/// What READ_REPLICATION_SLOT reports for an existing physical slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPosition {
    /// None until the slot has reserved WAL.
    pub restart_lsn: Option<Lsn>,
    pub restart_timeline: Option<PgTimelineId>,
}

/// A physical-replication connection in command mode.
///
/// Methods are not cancel-safe: a call dropped part-way leaves the protocol
/// position unknown, so the client marks itself broken first and every later
/// call fails with [`ReplicationError::ConnectionBroken`] instead of reading a
/// stale answer. A server ErrorResponse leaves it usable.
pub struct ReplicationClient {
    config: ReplicationConfig,
    reader: FrameReader<ReadHalf>,
    writer: FrameWriter<WriteHalf>,
    auth_method: AuthMethod,
    backend_pid: Option<i32>,
    broken: bool,
}

impl ReplicationClient {
    pub async fn connect(config: ReplicationConfig) -> Result<Self, ReplicationError> {
        let addr = format!("{}:{}", config.host, config.port);
        let connecting = TcpStream::connect((config.host.as_str(), config.port));
        let socket = timeout(std::time::Duration::from_millis(config.connect_timeout_ms), connecting)
            .await
            .map_err(|_| ReplicationError::Timeout { what: "connecting", timeout_ms: config.connect_timeout_ms })?
            .map_err(|source| ReplicationError::Connect { addr: addr.clone(), source })?;
        // Status updates are tiny and a commit waits on each: no Nagle delay.
        socket.set_nodelay(true)?;
        config.tcp_liveness.apply(&socket)?;
        let negotiating = config.tls.negotiate(socket, &config.host);
        let stream = timeout(std::time::Duration::from_millis(config.io_timeout_ms), negotiating)
            .await
            .map_err(|_| ReplicationError::Timeout { what: "negotiating TLS", timeout_ms: config.io_timeout_ms })?
            .map_err(|source| ReplicationError::Tls { addr: addr.clone(), source })?;
        let (read_half, write_half) = stream.split();
        let mut reader = FrameReader::new(read_half, config.max_message_bytes);
        let mut writer = FrameWriter::new(write_half);
        let session = auth::startup(&config, &mut reader, &mut writer).await?;
        debug!(%addr, application_name = %config.application_name, "connected for physical replication");
        Ok(ReplicationClient {
            config,
            reader,
            writer,
            auth_method: session.auth_method,
            backend_pid: session.backend_pid,
            broken: false,
        })
    }

    pub fn auth_method(&self) -> AuthMethod {
        self.auth_method
    }

    /// The walsender's process id (for pg_stat_replication.pid).
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    pub fn config(&self) -> &ReplicationConfig {
        &self.config
    }

    /// Run `sql` with the simple query protocol; all rows of all result
    /// sets, as text. A server error is returned once the server is ready
    /// for the next command.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        self.begin()?;
        self.writer.queue(|buf| frontend::query(sql, buf))?;
        self.writer.flush_within("sending a query", self.config.io_timeout_ms).await?;
        let mut rows = Vec::new();
        let mut result_bytes = 0usize;
        let mut columns = None;
        let mut server_error = None;
        loop {
            let frame = self.reader.next_frame("waiting for a query result", self.config.io_timeout_ms).await?;
            match frame.tag {
                tag::ROW_DESCRIPTION => columns = Some(parse_row_description(frame)?),
                tag::DATA_ROW => {
                    // Bound the whole answer, not just each message.
                    result_bytes += frame.body.len();
                    if result_bytes > self.config.max_message_bytes {
                        return Err(ReplicationError::protocol(format!(
                            "query result over {} bytes",
                            self.config.max_message_bytes
                        )));
                    }
                    let row = parse_data_row(frame)?;
                    if Some(row.len()) != columns {
                        return Err(ReplicationError::protocol(format!(
                            "DataRow with {} columns after a RowDescription of {columns:?}",
                            row.len()
                        )));
                    }
                    rows.push(row);
                }
                tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE => columns = None,
                tag::ERROR_RESPONSE => server_error = Some(parse_server_error(frame)?),
                tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS => {}
                tag::READY_FOR_QUERY => break,
                tag::COPY_BOTH_RESPONSE | tag::COPY_IN_RESPONSE | tag::COPY_OUT_RESPONSE => {
                    return Err(ReplicationError::protocol("query started COPY; use start_replication for streaming"));
                }
                _ => {
                    return Err(ReplicationError::protocol(format!(
                        "unexpected message {:?} in a query result",
                        char::from(frame.tag)
                    )))
                }
            }
        }
        self.broken = false;
        match server_error {
            Some(error) => Err(ReplicationError::Server(error)),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let row = single_row(self.simple_query("IDENTIFY_SYSTEM").await?, "IDENTIFY_SYSTEM", 4)?;
        Ok(SystemIdentity {
            system_id: parse_column(&row[0], "IDENTIFY_SYSTEM systemid")?,
            timeline: parse_column(&row[1], "IDENTIFY_SYSTEM timeline")?,
            xlogpos: parse_column(&row[2], "IDENTIFY_SYSTEM xlogpos")?,
            dbname: row[3].clone(),
        })
    }

    /// `TIMELINE_HISTORY n`: the ancestors of Postgres timeline `timeline`
    /// (timeline 1 has none and is not asked).
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<PgTimelineHistory, ReplicationError> {
        if timeline <= PG_FIRST_TIMELINE_ID {
            return Ok(PgTimelineHistory::first());
        }
        let query = format!("TIMELINE_HISTORY {timeline}");
        let row = single_row(self.simple_query(&query).await?, "TIMELINE_HISTORY", 2)?;
        let text = row[1].as_deref().unwrap_or_default();
        PgTimelineHistory::parse_file(timeline, text).map_err(|e| {
            ReplicationError::protocol(format!("the history file of timeline {timeline} does not parse: {e}"))
        })
    }

    /// `SHOW wal_segment_size` (e.g. "16MB") in bytes.
    pub async fn show_wal_segment_size(&mut self) -> Result<u64, ReplicationError> {
        let row = single_row(self.simple_query("SHOW wal_segment_size").await?, "SHOW wal_segment_size", 1)?;
        let text = row[0].as_deref().unwrap_or_default();
        parse_size_bytes(text)
            .ok_or_else(|| ReplicationError::protocol(format!("wal_segment_size {text:?} is not a size")))
    }

    /// `SHOW server_version_num` (150004 for 15.4, 160014 for 16.14).
    pub async fn show_server_version_num(&mut self) -> Result<u32, ReplicationError> {
        let row = single_row(self.simple_query("SHOW server_version_num").await?, "SHOW server_version_num", 1)?;
        let text = row[0].as_deref().unwrap_or_default();
        text.trim()
            .parse()
            .map_err(|_| ReplicationError::protocol(format!("server_version_num {text:?} is not a number")))
    }

    /// Create a physical slot that reserves WAL now; Ok(false) if it existed.
    pub async fn create_physical_slot_if_missing(&mut self, slot: &str) -> Result<bool, ReplicationError> {
        check_slot_name(slot)?;
        match self.simple_query(&format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")).await {
            Ok(_) => Ok(true),
            Err(error) if error.sqlstate() == Some(SQLSTATE_DUPLICATE_OBJECT) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// READ_REPLICATION_SLOT (PG15+); None if there is no such slot.
    pub async fn read_slot(&mut self, slot: &str) -> Result<Option<SlotPosition>, ReplicationError> {
        check_slot_name(slot)?;
        let rows = self.simple_query(&format!("READ_REPLICATION_SLOT {slot}")).await?;
        let row = single_row(rows, "READ_REPLICATION_SLOT", 3)?;
        // A missing slot is a row of NULLs, not an error.
        if row[0].is_none() {
            return Ok(None);
        }
        if row[0].as_deref() != Some("physical") {
            return Err(ReplicationError::protocol(format!("slot {slot} is {:?}, not physical", row[0])));
        }
        Ok(Some(SlotPosition {
            restart_lsn: row[1].as_ref().map(|_| parse_column(&row[1], "restart_lsn")).transpose()?,
            restart_timeline: row[2].as_ref().map(|_| parse_column(&row[2], "restart_tli")).transpose()?,
        }))
    }

    /// `START_REPLICATION SLOT slot PHYSICAL start TIMELINE timeline`; the
    /// connection becomes a stream of WAL.
    pub async fn start_replication(
        self,
        slot: &str,
        start: Lsn,
        timeline: PgTimelineId,
    ) -> Result<ReplicationStream, ReplicationError> {
        check_slot_name(slot)?;
        self.start_streaming(format!("START_REPLICATION SLOT {slot} PHYSICAL {start} TIMELINE {timeline}"), start).await
    }

    /// On a safekeeper's pg port, as the elected proposer of `term`: its log
    /// from `start` up to its flush LSN, committed or not (`TERM n`,
    /// docs/service.md). How a sync proposer, which has no Postgres, reads
    /// its donor. The `TIMELINE` is required by the grammar but not
    /// checked with `TERM`: a proposer reads the log, whatever Postgres
    /// timelines wrote it.
    pub async fn start_donor_replication(self, start: Lsn, term: Term) -> Result<ReplicationStream, ReplicationError> {
        self.start_streaming(format!("START_REPLICATION PHYSICAL {start} TIMELINE 1 TERM {term}"), start).await
    }

    async fn start_streaming(mut self, command: String, start: Lsn) -> Result<ReplicationStream, ReplicationError> {
        self.begin()?;
        self.writer.queue(|buf| frontend::query(&command, buf))?;
        self.writer.flush_within("sending START_REPLICATION", self.config.io_timeout_ms).await?;
        loop {
            let frame = self.reader.next_frame("waiting for CopyBothResponse", self.config.io_timeout_ms).await?;
            match frame.tag {
                tag::COPY_BOTH_RESPONSE => break,
                tag::ERROR_RESPONSE => return Err(ReplicationError::Server(parse_server_error(frame)?)),
                tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS => {}
                _ => {
                    return Err(ReplicationError::protocol(format!(
                        "expected CopyBothResponse to START_REPLICATION, got {:?}",
                        char::from(frame.tag)
                    )))
                }
            }
        }
        debug!(%command, "streaming started");
        Ok(ReplicationStream::new(self.reader, self.writer, &self.config, start))
    }

    /// Mark the connection busy; see the type's docs on cancellation.
    fn begin(&mut self) -> Result<(), ReplicationError> {
        if self.broken {
            return Err(ReplicationError::ConnectionBroken);
        }
        self.broken = true;
        Ok(())
    }
}

/// Slot names go into command text unquoted, so only Postgres's own slot
/// alphabet is allowed (which also rules out injection).
fn check_slot_name(slot: &str) -> Result<(), ReplicationError> {
    let valid = !slot.is_empty()
        && slot.len() <= MAX_SLOT_NAME_BYTES
        && slot.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ReplicationError::InvalidSlotName(slot.to_string()))
    }
}

fn single_row(
    mut rows: Vec<Vec<Option<String>>>,
    command: &str,
    columns: usize,
) -> Result<Vec<Option<String>>, ReplicationError> {
    match rows.pop() {
        Some(row) if rows.is_empty() && row.len() == columns => Ok(row),
        _ => Err(ReplicationError::protocol(format!("{command} did not return one row of {columns} columns"))),
    }
}

fn parse_column<T: std::str::FromStr>(value: &Option<String>, what: &str) -> Result<T, ReplicationError> {
    let text = value.as_deref().ok_or_else(|| ReplicationError::protocol(format!("{what} is NULL")))?;
    text.parse().map_err(|_| ReplicationError::protocol(format!("{what} {text:?} does not parse")))
}

/// A GUC size as SHOW prints it: a number and a unit (B, kB, MB, GB, TB).
pub(crate) fn parse_size_bytes(text: &str) -> Option<u64> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number: u64 = text[..digits_end].parse().ok()?;
    let shift = match text[digits_end..].trim() {
        "" | "B" => 0,
        "kB" => 10,
        "MB" => 20,
        "GB" => 30,
        "TB" => 40,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_show_prints_them() {
        assert_eq!(parse_size_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_size_bytes("1GB"), Some(1 << 30));
        assert_eq!(parse_size_bytes("8192"), Some(8192));
        assert_eq!(parse_size_bytes("MB"), None);
        assert_eq!(parse_size_bytes("16 parsecs"), None);
        assert_eq!(parse_size_bytes("99999999999999TB"), None);
    }

    #[test]
    fn slot_names_are_postgres_identifiers() {
        assert!(check_slot_name("safekeepers_1").is_ok());
        for bad in ["", "Upper", "a b", "x; DROP", &"a".repeat(64)] {
            assert!(check_slot_name(bad).is_err(), "{bad}");
        }
    }
}
