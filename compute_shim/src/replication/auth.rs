//! Startup and authentication: trust, cleartext, md5 and SCRAM-SHA-256
//! (without channel binding, since this client does not speak TLS).

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::config::ReplicationConfig;
use super::passfile;
use super::wire::{parse_server_error, tag, Body, Frame, FrameReader, FrameWriter};
use super::ReplicationError;

/// Messages accepted before ReadyForQuery; a server that keeps talking
/// past this is not one we want to wait for.
const MAX_STARTUP_MESSAGES: usize = 1000;

/// How the server had us prove who we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    Trust,
    Cleartext,
    Md5,
    ScramSha256,
}

/// What the server told us during startup.
#[derive(Debug)]
pub(crate) struct Session {
    pub auth_method: AuthMethod,
    pub backend_pid: Option<i32>,
}

/// Send the startup packet for a physical walsender and authenticate.
pub(crate) async fn startup<R, W>(
    config: &ReplicationConfig,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<Session, ReplicationError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // `replication=true` asks for a physical walsender; `database` would
    // make it a logical one, so it is sent only as a plain parameter.
    let mut parameters = vec![
        ("user", config.user.as_str()),
        ("replication", "true"),
        ("application_name", config.application_name.as_str()),
        ("client_encoding", "UTF8"),
    ];
    if let Some(dbname) = &config.dbname {
        parameters.push(("database", dbname.as_str()));
    }
    parameters.extend(config.extra_startup_parameters.iter().map(|(name, value)| (name.as_str(), value.as_str())));
    writer.queue(|buf| frontend::startup_message(parameters.iter().copied(), buf))?;
    writer.flush_within("sending the startup packet", config.io_timeout_ms).await?;
    let mut auth = Authenticator { config, method: AuthMethod::Trust, scram: None };
    let mut backend_pid = None;
    let mut authenticated = false;
    for _ in 0..MAX_STARTUP_MESSAGES {
        let frame = reader.next_frame("waiting for the server during startup", config.io_timeout_ms).await?;
        match frame.tag {
            tag::AUTHENTICATION if !authenticated => {
                authenticated = auth.step(frame, writer)?;
                writer.flush_within("sending credentials", config.io_timeout_ms).await?;
            }
            tag::ERROR_RESPONSE => return Err(ReplicationError::Server(parse_server_error(frame)?)),
            tag::BACKEND_KEY_DATA if authenticated => {
                let mut body = Body::new(frame.tag, frame.body);
                backend_pid = Some(body.i32()?);
            }
            tag::PARAMETER_STATUS | tag::NOTICE_RESPONSE | tag::NEGOTIATE_PROTOCOL_VERSION => {}
            tag::READY_FOR_QUERY if authenticated => {
                debug!(method = ?auth.method, ?backend_pid, "replication connection ready");
                return Ok(Session { auth_method: auth.method, backend_pid });
            }
            _ => {
                return Err(ReplicationError::protocol(format!(
                    "unexpected message {:?} during startup (is this a PostgreSQL server?)",
                    char::from(frame.tag)
                )))
            }
        }
    }
    Err(ReplicationError::protocol(format!("no ReadyForQuery within {MAX_STARTUP_MESSAGES} startup messages")))
}

struct Authenticator<'a> {
    config: &'a ReplicationConfig,
    method: AuthMethod,
    scram: Option<ScramState>,
}

enum ScramState {
    /// Sent our first message; waiting for the server's challenge.
    Started(ScramSha256),
    /// Sent our proof; waiting for the server's signature.
    Proved(ScramSha256),
    /// The server proved it knows the password too.
    Verified,
}

impl Authenticator<'_> {
    /// Handle one Authentication message; true once it is AuthenticationOk.
    fn step<W: AsyncWrite + Unpin>(
        &mut self,
        frame: Frame,
        writer: &mut FrameWriter<W>,
    ) -> Result<bool, ReplicationError> {
        let mut body = Body::new(frame.tag, frame.body);
        let code = body.i32()?;
        match code {
            0 => {
                body.finish()?;
                // A server that skips SCRAM's final message never proved it
                // knows the password: refuse, as libpq does.
                if matches!(self.scram, Some(ScramState::Started(_) | ScramState::Proved(_))) {
                    return Err(ReplicationError::Auth("server ended SCRAM without proving itself".into()));
                }
                Ok(true)
            }
            3 => {
                body.finish()?;
                self.method = AuthMethod::Cleartext;
                let password = self.password()?;
                writer.queue(|buf| frontend::password_message(password.as_bytes(), buf))?;
                Ok(false)
            }
            5 => {
                let salt = body.take(4)?;
                body.finish()?;
                self.method = AuthMethod::Md5;
                let salt = [salt[0], salt[1], salt[2], salt[3]];
                let hash = md5_hash(self.config.user.as_bytes(), self.password()?.as_bytes(), salt);
                writer.queue(|buf| frontend::password_message(hash.as_bytes(), buf))?;
                Ok(false)
            }
            10 => self.sasl_start(body, writer),
            11 => self.sasl_continue(body, writer),
            12 => self.sasl_final(body),
            other => Err(ReplicationError::Auth(format!(
                "the server asks for authentication method {other} (GSS/SSPI/Kerberos?), which this client does not support"
            ))),
        }
    }

    /// The connection string's password, else the password file's entry
    /// for this connection (read only now, when the server asks).
    fn password(&self) -> Result<String, ReplicationError> {
        if let Some(password) = &self.config.password {
            return Ok(password.clone());
        }
        let path = self.config.passfile.as_deref().ok_or(ReplicationError::PasswordRequired)?;
        let Ok(text) = std::fs::read_to_string(path) else { return Err(ReplicationError::PasswordRequired) };
        if passfile::readable_by_others(path) {
            tracing::warn!(passfile = %path.display(), "ignoring the password file: group or others can read it (chmod 0600)");
            return Err(ReplicationError::PasswordRequired);
        }
        let config = self.config;
        passfile::lookup(&text, &config.host, config.port, passfile::REPLICATION_DATABASE, &config.user)
            .ok_or(ReplicationError::PasswordRequired)
    }

    fn sasl_start<W: AsyncWrite + Unpin>(
        &mut self,
        mut body: Body,
        writer: &mut FrameWriter<W>,
    ) -> Result<bool, ReplicationError> {
        if self.scram.is_some() {
            return Err(ReplicationError::protocol("the server restarted SASL"));
        }
        let mut mechanisms = Vec::new();
        loop {
            let mechanism = body.cstr()?;
            if mechanism.is_empty() {
                break;
            }
            mechanisms.push(mechanism);
        }
        body.finish()?;
        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
            return Err(ReplicationError::Auth(format!("no supported SASL mechanism among {mechanisms:?}")));
        }
        self.method = AuthMethod::ScramSha256;
        // Without TLS there is no channel to bind to: gs2 flag 'n'.
        let scram = ScramSha256::new(self.password()?.as_bytes(), ChannelBinding::unsupported());
        writer.queue(|buf| frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), buf))?;
        self.scram = Some(ScramState::Started(scram));
        Ok(false)
    }

    fn sasl_continue<W: AsyncWrite + Unpin>(
        &mut self,
        mut body: Body,
        writer: &mut FrameWriter<W>,
    ) -> Result<bool, ReplicationError> {
        let Some(ScramState::Started(mut scram)) = self.scram.take() else {
            return Err(ReplicationError::protocol("SASLContinue out of order"));
        };
        scram.update(&body.rest()).map_err(|e| ReplicationError::Auth(format!("SCRAM challenge: {e}")))?;
        writer.queue(|buf| frontend::sasl_response(scram.message(), buf))?;
        self.scram = Some(ScramState::Proved(scram));
        Ok(false)
    }

    fn sasl_final(&mut self, mut body: Body) -> Result<bool, ReplicationError> {
        let Some(ScramState::Proved(mut scram)) = self.scram.take() else {
            return Err(ReplicationError::protocol("SASLFinal out of order"));
        };
        scram.finish(&body.rest()).map_err(|e| ReplicationError::Auth(format!("SCRAM server signature: {e}")))?;
        self.scram = Some(ScramState::Verified);
        Ok(false)
    }
}
