//! The first packet of a connection: untagged (length word, protocol code,
//! body). Protocol 3.0 carries NUL-terminated name/value parameters; the
//! other codes ask for TLS, GSS encryption or a cancel (Postgres's `pqcomm.h`).

use std::collections::HashMap;

pub const PROTOCOL_V3: u32 = 3 << 16;
pub const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
pub const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;
pub const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;

/// Largest startup packet accepted (Postgres's own limit is 10,000 bytes).
pub const MAX_STARTUP_PACKET_BYTES: usize = 10_000;
/// Smallest: the length word and the protocol code.
pub const MIN_STARTUP_PACKET_BYTES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("{what} is not NUL-terminated")]
    Unterminated { what: &'static str },
    #[error("{what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{0} bytes after the startup parameters")]
    Trailing(usize),
}

/// A protocol 3.0 startup packet with these parameters.
pub fn encode_startup_packet(parameters: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
    for (name, value) in parameters {
        for text in [name, value] {
            body.extend_from_slice(text.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).expect("startup packets we build are small");
    let mut packet = len.to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// The parameters of a 3.0 startup packet (the body after the protocol
/// code): name/value pairs ended by an empty name.
pub fn parse_startup_parameters(mut body: &[u8]) -> Result<HashMap<String, String>, StartupError> {
    let mut parameters = HashMap::new();
    loop {
        let name = take_cstring(&mut body, "startup parameter name")?;
        if name.is_empty() {
            break;
        }
        let value = take_cstring(&mut body, "startup parameter value")?;
        parameters.insert(name, value);
    }
    if !body.is_empty() {
        return Err(StartupError::Trailing(body.len()));
    }
    Ok(parameters)
}

/// Take a NUL-terminated UTF-8 string off the front of `input`.
pub fn take_cstring(input: &mut &[u8], what: &'static str) -> Result<String, StartupError> {
    let end = input.iter().position(|&b| b == 0).ok_or(StartupError::Unterminated { what })?;
    let text = std::str::from_utf8(&input[..end]).map_err(|_| StartupError::NotUtf8 { what })?;
    *input = &input[end + 1..];
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn startup_packets_round_trip() {
        let packet = encode_startup_packet(&[("user", "proposer"), ("tenant_id", "ab")]);
        assert_eq!(u32::from_be_bytes(packet[..4].try_into().unwrap()) as usize, packet.len());
        assert_eq!(u32::from_be_bytes(packet[4..8].try_into().unwrap()), PROTOCOL_V3);
        let parameters = parse_startup_parameters(&packet[8..]).unwrap();
        assert_eq!(parameters.get("user").map(String::as_str), Some("proposer"));
        assert_eq!(parameters.get("tenant_id").map(String::as_str), Some("ab"));
    }

    #[test]
    fn malformed_parameters_are_typed_errors() {
        assert_eq!(
            parse_startup_parameters(b"user").unwrap_err(),
            StartupError::Unterminated { what: "startup parameter name" }
        );
        assert_eq!(parse_startup_parameters(b"\0extra").unwrap_err(), StartupError::Trailing(5));
        assert_eq!(
            parse_startup_parameters(b"u\xff\0v\0\0").unwrap_err(),
            StartupError::NotUtf8 { what: "startup parameter name" }
        );
    }

    proptest! {
        #[test]
        fn any_parameter_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_startup_parameters(&bytes);
        }
    }
}
