//! Message type bytes (Postgres's protocol documentation, "Message Formats").

// Frontend (client to server).
pub const QUERY: u8 = b'Q';
pub const TERMINATE: u8 = b'X';
pub const COPY_FAIL: u8 = b'f';
pub const PASSWORD_MESSAGE: u8 = b'p';
/// Extended-query messages (Parse, Bind, Execute, Describe, Sync, Flush):
/// the safekeeper refuses them (simple protocol only).
pub const EXTENDED_QUERY: &[u8] = b"PBEDSHF";

// Both directions.
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';

// Backend (server to client).
pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const DATA_ROW: u8 = b'D';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ROW_DESCRIPTION: u8 = b'T';

/// A tag byte for messages: the character if printable, else its hex code.
pub fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        char::from(tag).to_string()
    } else {
        format!("\\x{tag:02x}")
    }
}
