//! The accept loop and per-connection protocol handling.
//!
//! Limits, in the order a connection meets them: a connection permit taken *before* `accept`
//! (so a flood waits in the kernel's backlog instead of costing us memory), a deadline on the
//! TLS handshake and on reading the first bytes that tell HTTP/1.1 from HTTP/2, the cap per
//! address group, then the registry's idle and header deadlines (`conns`). hyper's own
//! header-read timeout is off: it also runs while a keep-alive connection waits for its next
//! request, so it would cut idle connections at the header deadline.

use super::conns::{Close, ConnState, InFlight, Lease, Policy, Registry};
use super::response::Body;
use super::stream::Tracked;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
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
    /// Connections one IPv4 address (or IPv6 /64) may hold at once.
    pub max_connections_per_address: usize,
    pub handshake_timeout: Duration,
    /// How long an HTTP/1 request head may take to arrive, from its first byte.
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight is kept (HTTP/1 keep-alive, HTTP/2).
    pub idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
}

/// How long a connection told to close (idle, evicted) may take to say goodbye once no
/// request is in flight on it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

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
    let registry = Registry::new(Policy {
        max_connections: limits.max_connections,
        per_address: limits.max_connections_per_address,
        idle: limits.idle_timeout,
        header_read: limits.header_read_timeout,
        tarpit: limits.handshake_timeout,
    });
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
        let Ok(lease) = registry.admit(peer) else {
            // Past the per-address cap: held unread, then closed, before any handshake.
            registry.tarpit(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (tls, service) = (tls.clone(), service.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, tls, limits, service, &lease).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(lease);
            drop(permit);
        });
    }
    drop(listener);
    let open = registry.open();
    tracing::info!(open_connections = open, "stopped accepting; draining");
    registry.shut_down();
    match tokio::time::timeout(limits.shutdown_grace, registry.drained()).await {
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
    lease: &Lease,
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
            serve_io(tls, prefix, h2, peer, limits, service, lease).await
        }
        None => {
            let mut stream = stream;
            let (h2, prefix) = tokio::time::timeout(deadline, sniff(&mut stream))
                .await
                .map_err(|_| timed_out())??;
            serve_io(stream, prefix, h2, peer, limits, service, lease).await
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

/// Runs hyper on the connection until it ends or the registry's deadlines say it should close.
async fn serve_io<S>(
    io: S,
    prefix: Vec<u8>,
    h2: bool,
    peer: SocketAddr,
    limits: Limits,
    service: Service,
    lease: &Lease,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (state, policy) = (&lease.state, lease.policy());
    state.set_h2(h2);
    let io = TokioIo::new(Tracked::new(prefix, io, state.clone(), h2));
    let counted = state.clone();
    let svc = service_fn(move |req| {
        let guard = counted.request_started();
        let fut = service(req, peer);
        async move { Ok::<_, Infallible>(fut.await.map(|body| Counted { body, _guard: guard })) }
    });
    if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .max_header_list_size(64 * 1024)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .serve_connection(io, svc);
        drive(conn, state, policy, |c| c.graceful_shutdown()).await
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(64 * 1024)
            .serve_connection(io, svc);
        drive(conn, state, policy, |c| c.graceful_shutdown()).await
    }
}

/// Polls a hyper connection until it ends; when the registry says to close it, a slow head is
/// cut at once and anything else is shut down gracefully (HTTP/2 GOAWAY, HTTP/1 close after
/// the response in flight), with a bounded wait once no request is in flight (the
/// server's grace period bounds a drain instead).
async fn drive<C, E>(
    conn: C,
    state: &ConnState,
    policy: &Policy,
    graceful: impl FnOnce(Pin<&mut C>),
) -> io::Result<()>
where
    C: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::pin!(conn);
    let why = tokio::select! {
        r = conn.as_mut() => return r.map_err(io::Error::other),
        why = state.closing(policy) => why,
    };
    why.count();
    match why {
        Close::HeaderTimeout => {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request head timed out"))
        }
        Close::Idle | Close::Evicted | Close::Shutdown => graceful(conn.as_mut()),
    }
    if why == Close::Shutdown {
        // The server's grace period bounds this.
        return conn.await.map_err(io::Error::other);
    }
    tokio::select! {
        r = conn => r.map_err(io::Error::other),
        _ = state.quiet_for(CLOSE_GRACE) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "close did not complete"))
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it.
struct Counted {
    body: Body,
    _guard: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
