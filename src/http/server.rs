//! The accept loop and per-connection protocol handling.
//!
//! Limits, in the order a connection meets them: a connection permit taken *before* `accept`
//! (so a flood waits in the kernel's backlog instead of costing us memory), a deadline on the
//! TLS handshake and on reading the first bytes that tell HTTP/1.1 from HTTP/2, then hyper's
//! header-read timeout (which needs `TokioTimer`, or it silently does nothing).

use super::response::Body;
use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// What the transport calls for every request: the request and the peer's address in, a
/// response out. It must not panic (the api layer catches handler panics).
pub type Service = Arc<
    dyn Fn(hyper::Request<Incoming>, SocketAddr) -> BoxFuture<'static, hyper::Response<Body>>
        + Send
        + Sync,
>;

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `listener` until `shutdown` resolves, then stops accepting and gives in-flight
/// requests up to `limits.shutdown_grace` to finish. Returns 0 when everything drained, else
/// the number of connections that were open when draining began (an upper bound of those cut).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> usize {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (tls, service, watcher) = (tls.clone(), service.clone(), graceful.watcher());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, tls, limits, service, watcher).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(open_connections = open, "stopped accepting; draining");
    match tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => 0,
        Err(_) => {
            tracing::warn!(grace = ?limits.shutdown_grace, "grace period over; closing the rest");
            open.max(1)
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    service: Service,
    watcher: Watcher,
) -> io::Result<()> {
    let deadline = limits.handshake_timeout;
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "handshake or preface timed out");
    match tls {
        Some(acceptor) => {
            let mut tls = tokio::time::timeout(deadline, acceptor.accept(stream))
                .await
                .map_err(|_| timed_out())??;
            let (h2, prefix) = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                (true, Vec::new())
            } else {
                tokio::time::timeout(deadline, sniff(&mut tls)).await.map_err(|_| timed_out())??
            };
            serve_io(Prefixed::new(prefix, tls), h2, peer, limits, service, watcher).await
        }
        None => {
            let mut stream = stream;
            let (h2, prefix) = tokio::time::timeout(deadline, sniff(&mut stream))
                .await
                .map_err(|_| timed_out())??;
            serve_io(Prefixed::new(prefix, stream), h2, peer, limits, service, watcher).await
        }
    }
}

/// Reads just enough to tell HTTP/2 prior knowledge (h2c) from HTTP/1.x: the first byte that
/// differs from the HTTP/2 preface decides, so an HTTP/1 request line is never waited on.
async fn sniff<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(bool, Vec<u8>)> {
    let mut buf = [0u8; 24];
    let mut len = 0;
    while len < buf.len() {
        let n = io.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len] != H2_PREFACE[..len] {
            break;
        }
    }
    Ok((buf[..len] == H2_PREFACE[..], buf[..len].to_vec()))
}

async fn serve_io<S>(
    io: Prefixed<S>,
    h2: bool,
    peer: SocketAddr,
    limits: Limits,
    service: Service,
    watcher: Watcher,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let fut = service(req, peer);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .max_header_list_size(64 * 1024)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .serve_connection(io, svc);
        watcher.watch(conn).await
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(io, svc);
        watcher.watch(conn).await
    };
    result.map_err(io::Error::other)
}

/// A stream that first replays the bytes `sniff` consumed.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            buf.put_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniff_decides_on_the_first_differing_byte() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let request = b"GET /a/long/enough/path HTTP/1.1\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut a, request).await.unwrap();
        let (h2, prefix) = sniff(&mut b).await.unwrap();
        assert!(!h2);
        assert_eq!(prefix, request[..24]);

        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, H2_PREFACE).await.unwrap();
        assert_eq!(sniff(&mut b).await.unwrap(), (true, H2_PREFACE.to_vec()));
    }
}
