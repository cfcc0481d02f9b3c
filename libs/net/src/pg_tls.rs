//! The client side of Postgres's TLS negotiation: SSLRequest, the server's
//! one-byte answer ('S' or 'N'), then the TLS handshake, with libpq's
//! `sslmode` deciding what an 'N' or a certificate means. Used for the
//! shim's connections to Postgres (`--pg`'s sslmode) and to safekeepers
//! (verify-full with `--tls-ca`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::Stream;
use crate::tls::{client_config, TlsConfigError, Verification};

/// SSLRequest: length 8, then the code 1234.5679 (Postgres's `pqcomm.h`).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// libpq's `sslmode` values this client implements (`allow`, which
/// reconnects in plaintext-then-TLS order, is not among them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never ask for TLS.
    Disable,
    /// Ask; use TLS if the server offers it, plaintext if not; check no
    /// certificate (libpq's default).
    Prefer,
    /// TLS or nothing; check no certificate unless a root certificate is
    /// there (then as verify-ca, as libpq does).
    Require,
    /// TLS, and the server's certificate chains to the root certificate.
    VerifyCa,
    /// verify-ca, and the host name is in the certificate.
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported; use disable, prefer, require, verify-ca or verify-full".into()
                )
            }
            other => {
                return Err(format!("invalid sslmode {other:?} (disable, prefer, require, verify-ca or verify-full)"))
            }
        })
    }
}

/// A client's TLS settings for one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgClientTls {
    pub mode: SslMode,
    /// `sslrootcert`, or libpq's default `~/.postgresql/root.crt`.
    pub root_certificate: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("{0}")]
    Config(#[from] TlsConfigError),
    /// The server answered 'N' and the mode needs TLS (libpq's words).
    #[error("server does not support SSL, but SSL was required")]
    NotOffered,
    #[error("the server answered {0:#04x} to SSLRequest, neither 'S' nor 'N'")]
    BadAnswer(u8),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl PgTlsError {
    /// Whether retrying cannot help until someone changes a certificate or
    /// a setting: the server's certificate was not trusted, the server
    /// offers no TLS where it is required, or our own files are unusable.
    pub fn is_refusal(&self) -> bool {
        match self {
            PgTlsError::Config(_) | PgTlsError::NotOffered => true,
            PgTlsError::Handshake(error) => error
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|tls| matches!(tls, rustls::Error::InvalidCertificate(_))),
            PgTlsError::BadAnswer(_) | PgTlsError::Io(_) => false,
        }
    }
}

impl PgClientTls {
    /// Verify-full against `ca_file`: how our processes reach each other.
    pub fn verify_full(ca_file: &Path) -> PgClientTls {
        PgClientTls { mode: SslMode::VerifyFull, root_certificate: Some(ca_file.to_path_buf()) }
    }

    /// Negotiate on a fresh connection to `host`: the stream to speak the
    /// protocol on (TLS, or plain where the mode allows it).
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> Result<Stream, PgTlsError> {
        if self.mode == SslMode::Disable {
            return Ok(Stream::Plain(tcp));
        }
        // Build (and read the files) before asking, so a bad file is a
        // configuration error, not a broken connection.
        let config = Arc::new(self.client_config()?);
        tcp.write_all(&SSL_REQUEST).await?;
        match tcp.read_u8().await? {
            b'S' => {
                let tls = crate::tls::connect(config, host, tcp).await.map_err(PgTlsError::Handshake)?;
                Ok(Stream::Tls(Box::new(tls)))
            }
            b'N' if self.mode == SslMode::Prefer => Ok(Stream::Plain(tcp)),
            b'N' => Err(PgTlsError::NotOffered),
            other => Err(PgTlsError::BadAnswer(other)),
        }
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, TlsConfigError> {
        let root = self.root_certificate.as_deref().filter(|path| path.exists());
        let verification = match self.mode {
            SslMode::Disable | SslMode::Prefer => Verification::None,
            SslMode::Require if root.is_some() => Verification::Chain,
            SslMode::Require => Verification::None,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::VerifyFull => Verification::Full,
        };
        if verification != Verification::None && root.is_none() {
            let named = self.root_certificate.as_deref().map(|p| p.display().to_string());
            return Err(crate::tls::TlsConfigError::new(format!(
                "sslmode={} needs a root certificate: {} does not exist (set sslrootcert)",
                self.mode.name(),
                named.unwrap_or_else(|| "~/.postgresql/root.crt".into())
            )));
        }
        client_config(root, verification)
    }
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssl_request_is_postgres_s() {
        assert_eq!(u32::from_be_bytes(SSL_REQUEST[..4].try_into().unwrap()), 8);
        assert_eq!(u32::from_be_bytes(SSL_REQUEST[4..].try_into().unwrap()), (1234 << 16) | 5679);
    }

    #[test]
    fn modes_parse_by_libpq_names() {
        for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            assert_eq!(mode.name().parse::<SslMode>(), Ok(mode));
        }
        assert!("allow".parse::<SslMode>().unwrap_err().contains("not supported"));
        assert!("verify_full".parse::<SslMode>().is_err());
    }

    #[test]
    fn verifying_modes_need_a_root_certificate() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let tls = PgClientTls { mode, root_certificate: Some("/nonexistent/root.crt".into()) };
            let error = tls.client_config().unwrap_err().to_string();
            assert!(error.contains("needs a root certificate") && error.contains("/nonexistent/root.crt"), "{error}");
        }
        let tls = PgClientTls { mode: SslMode::Require, root_certificate: Some("/nonexistent/root.crt".into()) };
        assert!(tls.client_config().is_ok(), "require without a root certificate checks nothing");
    }
}
