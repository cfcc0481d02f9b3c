//! Connection settings, parsed from a libpq-style connection string
//! (`host=127.0.0.1 port=5432 user=postgres password='a b'`) or URI
//! (`postgresql://user:pass@host:port/db?application_name=x`).
//!
//! Only what a TCP physical-replication client needs is accepted; an unknown
//! keyword is an error rather than silently ignored, so typos surface.

use std::str::FromStr;

use net::pg_tls::{PgClientTls, SslMode};

use super::ReplicationError;
use crate::tcp_liveness::TcpLiveness;

pub const DEFAULT_PORT: u16 = 5432;
pub const DEFAULT_APPLICATION_NAME: &str = "compute_shim";
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_STREAM_TIMEOUT_MS: u64 = 30_000;
/// Larger than any message a walsender sends (XLogData carries at most
/// 128 KiB), small enough that a hostile length cannot exhaust memory.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;

#[derive(Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    /// Where the password is looked up when `password` is not given and the
    /// server asks for one (`passfile=`, else `PGPASSFILE`, else ~/.pgpass).
    pub passfile: Option<std::path::PathBuf>,
    /// Sent as `database`; a physical walsender ignores it.
    pub dbname: Option<String>,
    /// What `synchronous_standby_names` must name.
    pub application_name: String,
    pub connect_timeout_ms: u64,
    /// Bound on every read and write outside streaming (handshake, queries).
    pub io_timeout_ms: u64,
    /// While streaming: silence after which the stream pings the walsender
    /// (half of it) and then fails (all of it).
    pub stream_timeout_ms: u64,
    pub max_message_bytes: usize,
    /// Keepalive and user timeout on the socket (the shim's flags).
    pub tcp_liveness: TcpLiveness,
    /// More startup parameters, set by code (a safekeeper's pg port is told
    /// the tenant and timeline this way), never parsed from a conninfo.
    pub extra_startup_parameters: Vec<(String, String)>,
    /// `sslmode` and `sslrootcert` (libpq's default: prefer, and
    /// ~/.postgresql/root.crt).
    pub tls: PgClientTls,
}

impl std::fmt::Debug for ReplicationConfig {
    // Keeps the password out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("passfile", &self.passfile)
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("io_timeout_ms", &self.io_timeout_ms)
            .field("stream_timeout_ms", &self.stream_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("tcp_liveness", &self.tcp_liveness)
            .field("extra_startup_parameters", &self.extra_startup_parameters)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ReplicationConfig {
    /// Parse a keyword/value string or a `postgresql://` URI.
    pub fn parse(conninfo: &str) -> Result<Self, ReplicationError> {
        let trimmed = conninfo.trim();
        let pairs = match trimmed.strip_prefix("postgresql://").or_else(|| trimmed.strip_prefix("postgres://")) {
            Some(rest) => parse_uri(rest)?,
            None => parse_keyword_values(trimmed)?,
        };
        let mut builder = Builder::default();
        for (key, value) in pairs {
            builder.set(&key, value)?;
        }
        builder.build()
    }

    pub fn with_startup_parameter(mut self, name: &str, value: &str) -> Self {
        self.extra_startup_parameters.push((name.to_string(), value.to_string()));
        self
    }

    pub fn with_application_name(mut self, name: &str) -> Self {
        self.application_name = name.to_string();
        self
    }

    pub fn with_io_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.io_timeout_ms = timeout_ms;
        self
    }

    pub fn with_stream_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.stream_timeout_ms = timeout_ms;
        self
    }

    pub fn with_connect_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.connect_timeout_ms = timeout_ms;
        self
    }

    pub fn with_tcp_liveness(mut self, liveness: TcpLiveness) -> Self {
        self.tcp_liveness = liveness;
        self
    }
}

impl FromStr for ReplicationConfig {
    type Err = ReplicationError;
    fn from_str(conninfo: &str) -> Result<Self, ReplicationError> {
        ReplicationConfig::parse(conninfo)
    }
}

fn config_error(detail: impl Into<String>) -> ReplicationError {
    ReplicationError::Config(detail.into())
}

#[derive(Default)]
struct Builder {
    host: Option<String>,
    hostaddr: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    application_name: Option<String>,
    connect_timeout_ms: Option<u64>,
    passfile: Option<String>,
    sslmode: Option<SslMode>,
    sslrootcert: Option<String>,
}

impl Builder {
    fn set(&mut self, key: &str, value: String) -> Result<(), ReplicationError> {
        match key {
            "host" => self.host = Some(single_host(value)?),
            "hostaddr" => self.hostaddr = Some(single_host(value)?),
            "port" => self.port = Some(value.parse().map_err(|_| config_error(format!("bad port {value:?}")))?),
            "user" => self.user = Some(value),
            "password" => self.password = Some(value),
            "passfile" => self.passfile = Some(value),
            "dbname" => self.dbname = Some(value),
            "application_name" => self.application_name = Some(value),
            // libpq counts this one in seconds.
            "connect_timeout" => {
                let seconds: u64 =
                    value.parse().map_err(|_| config_error(format!("bad connect_timeout {value:?} (seconds)")))?;
                self.connect_timeout_ms = Some(seconds.saturating_mul(1000));
            }
            "replication" => match value.as_str() {
                "true" | "on" | "yes" | "1" => {}
                _ => {
                    return Err(config_error(format!("replication={value} is not supported; this client is physical")))
                }
            },
            "sslmode" => self.sslmode = Some(value.parse().map_err(config_error)?),
            "sslrootcert" => {
                if value == "system" {
                    return Err(config_error("sslrootcert=system is not supported; name a CA certificate file"));
                }
                self.sslrootcert = Some(value)
            }
            _ => return Err(config_error(format!("unsupported keyword {key:?}"))),
        }
        Ok(())
    }

    fn build(self) -> Result<ReplicationConfig, ReplicationError> {
        let user = self.user.ok_or_else(|| config_error("no user given"))?;
        let host = self.hostaddr.or(self.host).unwrap_or_else(|| "127.0.0.1".to_string());
        if host.starts_with('/') {
            return Err(config_error(format!("host {host:?} is a Unix socket directory; this client uses TCP only")));
        }
        Ok(ReplicationConfig {
            host,
            port: self.port.unwrap_or(DEFAULT_PORT),
            user,
            password: self.password,
            passfile: match self.passfile {
                Some(path) => Some(path.into()),
                None => super::passfile::default_location(
                    std::env::var("PGPASSFILE").ok().as_deref(),
                    std::env::var("HOME").ok().as_deref(),
                ),
            },
            dbname: self.dbname,
            application_name: self.application_name.unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_string()),
            connect_timeout_ms: self.connect_timeout_ms.unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS),
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
            stream_timeout_ms: DEFAULT_STREAM_TIMEOUT_MS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            tcp_liveness: TcpLiveness::default(),
            extra_startup_parameters: Vec::new(),
            tls: PgClientTls {
                mode: self.sslmode.unwrap_or(SslMode::Prefer),
                root_certificate: match self.sslrootcert {
                    Some(path) => Some(path.into()),
                    None => std::env::var("HOME").ok().map(|home| format!("{home}/.postgresql/root.crt").into()),
                },
            },
        })
    }
}

fn single_host(value: String) -> Result<String, ReplicationError> {
    if value.contains(',') {
        return Err(config_error(format!("several hosts ({value:?}) are not supported")));
    }
    Ok(value)
}

/// `key=value` pairs separated by whitespace; values may be single-quoted,
/// and a backslash escapes the next character (libpq's rules).
fn parse_keyword_values(input: &str) -> Result<Vec<(String, String)>, ReplicationError> {
    let mut pairs = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(config_error(format!("missing '=' after {key:?}")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(config_error(format!("unterminated quoted value for {key:?}"))),
                    Some('\'') => break,
                    Some('\\') => value.push(chars.next().ok_or_else(|| config_error("trailing backslash"))?),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().ok_or_else(|| config_error("trailing backslash"))?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// The part of a URI after `postgresql://`.
fn parse_uri(rest: &str) -> Result<Vec<(String, String)>, ReplicationError> {
    let mut pairs = Vec::new();
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = userinfo.split_once(':').map_or((userinfo, None), |(u, p)| (u, Some(p)));
        if !user.is_empty() {
            pairs.push(("user".to_string(), percent_decode(user)?));
        }
        if let Some(password) = password {
            pairs.push(("password".to_string(), percent_decode(password)?));
        }
    }
    let (host, port) = split_host_port(hostport)?;
    if !host.is_empty() {
        pairs.push(("host".to_string(), percent_decode(host)?));
    }
    if let Some(port) = port {
        pairs.push(("port".to_string(), port.to_string()));
    }
    if !path.is_empty() {
        pairs.push(("dbname".to_string(), percent_decode(path)?));
    }
    for parameter in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) =
            parameter.split_once('=').ok_or_else(|| config_error(format!("URI parameter {parameter:?} has no '='")))?;
        pairs.push((percent_decode(key)?, percent_decode(value)?));
    }
    Ok(pairs)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(hostport: &str) -> Result<(&str, Option<&str>), ReplicationError> {
    if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) =
            bracketed.split_once(']').ok_or_else(|| config_error(format!("unclosed '[' in {hostport:?}")))?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|port| (host, Some(port)))
                .ok_or_else(|| config_error(format!("junk after ']' in {hostport:?}"))),
        };
    }
    Ok(hostport.split_once(':').map_or((hostport, None), |(host, port)| (host, Some(port))))
}

fn percent_decode(input: &str) -> Result<String, ReplicationError> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(|| config_error(format!("bad escape in {input:?}")))?;
            let hex = std::str::from_utf8(hex).map_err(|_| config_error(format!("bad escape in {input:?}")))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| config_error(format!("bad escape in {input:?}")))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| config_error(format!("{input:?} is not UTF-8 once decoded")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_values_with_quotes_and_escapes() {
        let config = ReplicationConfig::parse(
            "host=127.0.0.1 port = 5433 user=postgres password='it''s' dbname=postgres application_name=shim",
        );
        // libpq has no '' escape inside quotes: that is two quoted values run together, an error here.
        assert!(config.is_err());
        let config = ReplicationConfig::parse(
            r"host=127.0.0.1 port = 5433 user=postgres password='a \'b\\' application_name=shim",
        )
        .unwrap();
        assert_eq!(config.port, 5433);
        assert_eq!(config.password.as_deref(), Some(r"a 'b\"));
        assert_eq!(config.application_name, "shim");
        assert!(format!("{config:?}").contains("<hidden>"));
    }

    #[test]
    fn uri_form() {
        let config =
            ReplicationConfig::parse("postgresql://r%201:p%40ss@[::1]:6000/db?application_name=x&connect_timeout=2")
                .unwrap();
        assert_eq!(config.user, "r 1");
        assert_eq!(config.password.as_deref(), Some("p@ss"));
        assert_eq!((config.host.as_str(), config.port), ("::1", 6000));
        assert_eq!(config.dbname.as_deref(), Some("db"));
        assert_eq!(config.application_name, "x");
        assert_eq!(config.connect_timeout_ms, 2000);
    }

    #[test]
    fn tls_settings_are_libpqs() {
        let config = ReplicationConfig::parse("user=a sslmode=verify-full sslrootcert=/etc/ca.crt").unwrap();
        assert_eq!(config.tls.mode, SslMode::VerifyFull);
        assert_eq!(config.tls.root_certificate.as_deref(), Some(std::path::Path::new("/etc/ca.crt")));
        assert_eq!(ReplicationConfig::parse("user=a").unwrap().tls.mode, SslMode::Prefer, "libpq's default");
        let uri = ReplicationConfig::parse("postgresql://a@h/db?sslmode=require").unwrap();
        assert_eq!(uri.tls.mode, SslMode::Require);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        for bad in [
            "user=a replication=database",
            "user=a sslmode=allow",
            "user=a sslmode=verify_full",
            "user=a sslrootcert=system",
            "user=a host=/tmp",
            "user=a colour=blue",
            "user=a port=x",
            "host=h",
            "user=a password='open",
            "postgresql://u@h/db?x",
        ] {
            assert!(matches!(ReplicationConfig::parse(bad), Err(ReplicationError::Config(_))), "{bad}");
        }
    }
}
