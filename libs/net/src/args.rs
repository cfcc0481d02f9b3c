//! The TLS flags every server and client of the project takes, spelled
//! once (docs/security.md, "TLS").

use std::path::PathBuf;
use std::sync::Arc;

use crate::tls::{client_config, ServerTls, TlsConfigError, Verification};

/// `--tls-cert`, `--tls-key`, `--allow-plaintext` of a process's ports.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServerTlsArgs {
    /// Certificate chain (PEM, leaf first) served on this process's ports;
    /// with it, plaintext connections are refused unless --allow-plaintext.
    /// Reloaded with --tls-key on SIGHUP (connections already open keep
    /// theirs).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --tls-cert: accept plaintext connections too (for a migration
    /// to TLS; docs/security.md).
    #[arg(long, requires = "tls_cert")]
    pub allow_plaintext: bool,
}

impl ServerTlsArgs {
    /// The port's TLS, loaded with `alpn` offered; `None` without --tls-cert.
    pub fn load(&self, alpn: &[&[u8]]) -> Result<Option<Arc<ServerTls>>, TlsConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(Arc::new(ServerTls::load(cert, key, alpn)?))),
            _ => Ok(None),
        }
    }
}

/// `--tls-ca`: connect to the project's servers over TLS, trusting this CA.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientTlsArgs {
    /// CA certificate(s) (PEM) that signed the safekeepers' certificates:
    /// with it every connection to them uses TLS and checks the chain and
    /// the host name dialled (as libpq's sslmode=verify-full).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub fn client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, TlsConfigError> {
        self.tls_ca.as_deref().map(|ca| client_config(Some(ca), Verification::Full).map(Arc::new)).transpose()
    }
}
