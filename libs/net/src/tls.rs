//! TLS configuration from PEM files (rustls, ring provider).
//!
//! - [`ServerTls`]: a certificate chain and key for a listening port. New
//!   handshakes pick up [`ServerTls::reload`]ed files; connections already
//!   established keep the session they have (SIGHUP reloads without
//!   dropping anyone). A reload that fails keeps the old pair and says why.
//! - [`client_config`]: what a client trusts, and how much it checks:
//!   chain and name (`verify-full`, every link between our processes),
//!   chain only (`verify-ca`), or nothing but the handshake (`require`),
//!   libpq's `sslmode`s.
//!
//! Errors name the file and what is wrong with it, never its contents.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// A TLS setting that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsConfigError(String);

impl TlsConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        TlsConfigError(message.into())
    }
}

fn config_error(message: impl Into<String>) -> TlsConfigError {
    TlsConfigError(message.into())
}

/// The one crypto provider every process uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a chain: leaf first).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| config_error(format!("reading certificates from {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(format!("{}: not a PEM certificate file: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(config_error(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certificates)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| config_error(format!("{}: no usable PEM private key: {e}", path.display())))
}

/// A certificate chain and key from their files, checked to belong together.
fn load_certified_key(certificate: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    let chain = load_certificates(certificate)?;
    let key_der = load_private_key(key)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| config_error(format!("{}: unsupported private key: {e}", key.display())))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        config_error(format!("{} is not the key of the certificate in {}: {e}", key.display(), certificate.display()))
    })?;
    Ok(Arc::new(certified))
}

/// The server side of a port: its certificate files and the config that
/// serves whichever pair was loaded last.
pub struct ServerTls {
    certificate_path: PathBuf,
    key_path: PathBuf,
    current: Arc<CurrentKey>,
    config: Arc<ServerConfig>,
}

/// The pair new handshakes get; swapped by a reload.
struct CurrentKey(RwLock<Arc<CertifiedKey>>);

impl fmt::Debug for CurrentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentKey")
    }
}

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

impl ServerTls {
    /// Load `certificate` (PEM chain) and `key`; `alpn` lists the
    /// application protocols offered (the pg port offers "postgresql", as
    /// PostgreSQL 17's direct TLS needs).
    pub fn load(certificate: &Path, key: &Path, alpn: &[&[u8]]) -> Result<ServerTls, TlsConfigError> {
        let current = Arc::new(CurrentKey(RwLock::new(load_certified_key(certificate, key)?)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("TLS versions: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(ServerTls {
            certificate_path: certificate.to_path_buf(),
            key_path: key.to_path_buf(),
            current,
            config: Arc::new(config),
        })
    }

    /// Read the files again; on success new handshakes use the new pair.
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        let fresh = load_certified_key(&self.certificate_path, &self.key_path)?;
        *self.current.0.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// [`ServerTls::reload`] on SIGHUP, saying in the log what came of it
    /// for `port` (a failure keeps the old pair).
    pub fn reload_logged(&self, port: &str) {
        match self.reload() {
            Ok(()) => {
                tracing::info!(port, certificate = %self.certificate_path.display(), "SIGHUP: TLS certificate reloaded")
            }
            Err(error) => tracing::error!(port, "SIGHUP: TLS certificate not reloaded, the old one stays: {error}"),
        }
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// How much of the server's certificate a client checks (libpq's sslmode
/// names for the last three).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Encrypt, check nothing about who answers (`require`).
    None,
    /// The chain leads to a trusted CA (`verify-ca`).
    Chain,
    /// The chain, and the name the client dialled is in the certificate
    /// (`verify-full`; what every link between our own processes uses).
    Full,
}

/// A client config trusting the CA certificates in `ca_file` (`None`: only
/// allowed with [`Verification::None`]) and checking `verification`.
pub fn client_config(ca_file: Option<&Path>, verification: Verification) -> Result<ClientConfig, TlsConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(format!("TLS versions: {e}")))?;
    let config = match (verification, ca_file) {
        (Verification::None, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient { chain: None }))
            .with_no_client_auth(),
        (_, None) => return Err(config_error("checking the server's certificate needs a CA certificate file")),
        (Verification::Full, Some(ca_file)) => {
            builder.with_root_certificates(root_store(ca_file)?).with_no_client_auth()
        }
        (Verification::Chain, Some(ca_file)) => {
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(ca_file)?), provider())
                .build()
                .map_err(|e| config_error(format!("{}: {e}", ca_file.display())))?;
            let lenient = Lenient { chain: Some(verifier) };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(lenient)).with_no_client_auth()
        }
    };
    Ok(config)
}

fn root_store(ca_file: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(ca_file)? {
        roots
            .add(certificate)
            .map_err(|e| config_error(format!("{}: not a usable CA certificate: {e}", ca_file.display())))?;
    }
    Ok(roots)
}

/// The name a client checks the certificate against: a host name or an
/// IP address, as dialled.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsConfigError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| config_error(format!("{host:?} is not a TLS server name: {e}")))
}

/// The checks below verify-full: `verify-ca` (the web-PKI chain check, a
/// name mismatch forgiven) and `require` (no certificate check). Either
/// way the handshake's signatures are checked, so the session key is the
/// one the certificate's owner holds.
#[derive(Debug)]
struct Lenient {
    /// `None`: accept any certificate.
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Connect TLS over `tcp` to `host` as a client.
pub async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: tokio::net::TcpStream,
) -> Result<crate::stream::TlsTcpStream, std::io::Error> {
    let name = server_name(host).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.0))?;
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    Ok(tokio_rustls::TlsStream::Client(tls))
}
