//! A connection whose writes fail once they have been pending too long.
//!
//! hyper has no timeout for a client that stops reading a response: the
//! server's write just stays pending, and a streamed WAL body holds its
//! connection and a chunk of memory for as long as the client likes. Each
//! accepted connection is wrapped so that a write pending for longer than
//! its timeout fails with `TimedOut`; hyper then drops the connection and
//! everything its response held.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// An I/O object whose writes fail once they have been pending too long.
pub struct StallGuard<S> {
    inner: S,
    timeout: Duration,
    /// Running while a write is pending; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        StallGuard { inner, timeout, stalled: None }
    }

    /// Pass on `result`; while pending, fail once the stall timer fires.
    fn guard<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let timeout = self.timeout;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the HTTP client read nothing for {} s", timeout.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // Waiting for a request is not a stall (keep-alive idles).
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that never reads: writes fill the socket buffers, then the
    /// next one fails after the timeout instead of hanging.
    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_times_out() {
        let (client, server) = tokio::io::duplex(64 << 10);
        let mut guarded = StallGuard::new(server, Duration::from_secs(60));
        let chunk = vec![7u8; 16 << 10];
        let started = tokio::time::Instant::now();
        let error = loop {
            if let Err(error) = guarded.write_all(&chunk).await {
                break error;
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(60));
        drop(client);
    }

    /// Progress resets the timer: a slow but steady reader is never cut off.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_not_cut_off() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(server, Duration::from_secs(60));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let mut total = 0;
            while total < 100 * 1024 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                total += tokio::io::AsyncReadExt::read(&mut client, &mut buf).await.unwrap();
            }
        });
        for _ in 0..100 {
            guarded.write_all(&[1u8; 1024]).await.expect("progress every 30 s is not a stall");
        }
        reader.await.unwrap();
    }
}
