//! An incremental Server-Sent Events parser: bytes in, whole events out, in whatever pieces the
//! network delivers them (a line split across chunks, `\r\n` or `\n`, several events at once).

/// One event's `data` (lines joined with `\n`); other fields are not used by LLM streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub data: String,
}

/// Feeds on chunks and yields complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
}

/// A single event line may not exceed this, so a hostile upstream cannot grow our memory.
pub const MAX_LINE: usize = 1 << 20;

/// Why a stream is not valid SSE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an SSE line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("an SSE line is not UTF-8")]
    NotUtf8,
}

impl SseParser {
    /// Consumes `chunk`, appending every event it completes to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let line = &self.buf[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?.to_string();
            start = end + 1;
            self.line(&line, out);
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            return Err(SseError::LineTooLong);
        }
        Ok(())
    }

    /// The end of the stream: an event without its closing blank line still counts.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            self.line(rest.trim_end_matches('\r'), out);
        }
        self.line("", out);
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                out.push(SseEvent { data });
            }
            return;
        }
        if line.starts_with(':') {
            return; // a comment, used as keep-alive
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            p.feed(chunk, &mut out).unwrap();
        }
        p.finish(&mut out);
        out.into_iter().map(|e| e.data).collect()
    }

    #[test]
    fn events_survive_any_chunking() {
        let input = "data: {\"a\":1}\n\n: keep-alive\n\ndata: one\r\ndata: two\r\n\r\nevent: x\ndata:[DONE]\n\n";
        let want = vec!["{\"a\":1}".to_string(), "one\ntwo".into(), "[DONE]".into()];
        for piece in [1, 2, 3, 7, 100] {
            assert_eq!(parse_in_pieces(input.as_bytes(), piece), want, "piece {piece}");
        }
    }

    #[test]
    fn a_last_event_without_blank_line_counts_and_utf8_may_split() {
        let input = "data: caf\u{e9} 東京\ndata: end";
        assert_eq!(parse_in_pieces(input.as_bytes(), 1), vec!["caf\u{e9} 東京\nend".to_string()]);
    }

    #[test]
    fn hostile_lines_are_refused() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        assert_eq!(p.feed(&vec![b'a'; MAX_LINE + 1], &mut out), Err(SseError::LineTooLong));
        let mut p = SseParser::default();
        assert_eq!(p.feed(b"data: \xff\xfe\n", &mut out), Err(SseError::NotUtf8));
    }
}
