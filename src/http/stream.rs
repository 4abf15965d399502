//! The byte stream hyper reads and writes: it replays the bytes protocol sniffing consumed,
//! tells the connection's state when a new HTTP/1 request head begins, and gives hyper's own
//! answers to unparsable HTTP/1 requests (a bare `400`, `414` or `431` with no body) the JSON
//! error body every other error has.

use super::conns::ConnState;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection's stream as hyper sees it.
pub(super) struct Tracked<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
    state: Arc<ConnState>,
    h2: bool,
    /// A rewritten error response still to be written, and how much of it has been.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> Tracked<S> {
    /// `inner` as hyper sees it, `prefix` (the bytes sniffing read) first.
    pub fn new(prefix: Vec<u8>, inner: S, state: Arc<ConnState>, h2: bool) -> Self {
        Tracked { prefix, pos: 0, inner, state, h2, pending: None }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
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
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.state.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> Tracked<S> {
    /// Writes what is left of a rewritten response; ready once nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            if *done == bytes.len() {
                self.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The JSON answer to write instead of `buf`, when `buf` is hyper's own answer to a head
    /// it could not parse.
    fn rewrite(&self, buf: &[u8]) -> Option<Vec<u8>> {
        if self.h2 || !self.state.answering_unparsed_head() {
            return None;
        }
        parse_error_response(buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(replacement) = self.rewrite(buf) {
            self.pending = Some((replacement, 0));
            // Accepted whole: what is left goes out on the next write or flush.
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
        if self.pending.is_some() || self.rewrite(first).is_some() {
            // Rare (an error answer being rewritten): one slice at a time.
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's automatic answer to an unparsable request, rebuilt with a JSON body in both error
/// shapes (the request's path, and so its face, is unknown).
fn parse_error_response(head: &[u8]) -> Option<Vec<u8>> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    let (status, message) = match rest.get(..3)? {
        b"400" => (
            "400 Bad Request",
            "the request could not be parsed: its request line or a header is malformed \
             (header values may not contain control characters such as NUL or DEL)",
        ),
        b"414" => ("414 URI Too Long", "the request URI is too long"),
        b"431" => (
            "431 Request Header Fields Too Large",
            "the request headers are too large (at most 64 KiB in all)",
        ),
        _ => return None,
    };
    let body = serde_json::json!({
        "detail": message,
        "error": {"message": message, "type": "invalid_request_error", "param": null, "code": null},
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    Some([head.into_bytes(), body.into_bytes()].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_error_heads_are_rewritten() {
        let out = parse_error_response(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        let text = String::from_utf8(out.unwrap()).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        let body: serde_json::Value =
            serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert!(body["detail"].as_str().unwrap().contains("malformed"));
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(parse_error_response(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        assert!(parse_error_response(b"{\"HTTP/1.1 400\"}").is_none());
    }
}
