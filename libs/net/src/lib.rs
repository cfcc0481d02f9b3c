//! How the project's processes talk over TCP:
//!
//! - [`tls`]: rustls server and client configuration from PEM files; a
//!   server's certificate reloads without dropping connections.
//! - [`pg_tls`]: a Postgres-wire client's SSLRequest and libpq's sslmodes.
//! - [`stream`]: a connection that is plain TCP or TLS, split into halves.
//! - [`http_server`]: the accept loop every HTTP port uses (TLS, connection
//!   cap, header-read timeout, write-stall timeout).
//! - [`stall_guard`]: the write-stall timeout on its own.
//! - [`args`]: the TLS flags (`--tls-cert`, `--tls-key`, `--allow-plaintext`, `--tls-ca`).

pub mod args;
pub mod http_server;
pub mod pg_tls;
pub mod stall_guard;
pub mod stream;
pub mod tls;
