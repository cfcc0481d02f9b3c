//! `--listen-addrs-file FILE`: where a process reports the addresses it
//! listens on. A process given port 0 binds whatever port the kernel picks;
//! this file is how a supervisor (the test harness, a script) learns it
//! without guessing a free port and racing other processes for it.
//!
//! Format: one `name=host:port` line per listener (`pg=127.0.0.1:40123`).
//! The file appears complete or not at all: it is written to a temporary
//! name and renamed once every listener is bound, so a reader that finds it
//! may connect at once.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};

use crate::durable::write_file_atomically;

/// Write `addrs` (listener name, bound address) to `path` atomically.
pub fn write_listen_addrs(path: &Path, addrs: &[(&str, SocketAddr)]) -> anyhow::Result<()> {
    let text: String = addrs.iter().map(|(name, addr)| format!("{name}={addr}\n")).collect();
    let name = path.file_name().and_then(|name| name.to_str()).context("--listen-addrs-file names no file")?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    write_file_atomically(dir, name, &format!("{name}.tmp"), text.as_bytes())
        .with_context(|| format!("writing the listen addresses to {}", path.display()))
}

/// Parse what [`write_listen_addrs`] wrote.
pub fn parse_listen_addrs(text: &str) -> anyhow::Result<Vec<(String, SocketAddr)>> {
    let mut addrs = Vec::new();
    for line in text.lines() {
        let Some((name, addr)) = line.split_once('=') else { bail!("listen address line {line:?} lacks '='") };
        let addr = addr.parse().with_context(|| format!("listen address line {line:?}"))?;
        addrs.push((name.to_string(), addr));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_addresses_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("addrs");
        let pg: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let http: SocketAddr = "[::1]:80".parse().unwrap();
        write_listen_addrs(&path, &[("pg", pg), ("http", http)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "pg=127.0.0.1:40123\nhttp=[::1]:80\n");
        assert_eq!(parse_listen_addrs(&text).unwrap(), vec![("pg".to_string(), pg), ("http".to_string(), http)]);
        assert!(!dir.path().join("addrs.tmp").exists(), "the temporary file is renamed away");
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse_listen_addrs("pg 127.0.0.1:1\n").is_err());
        assert!(parse_listen_addrs("pg=localhost\n").is_err());
    }
}
