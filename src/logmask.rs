//! Masks the server's configured secrets in every log line, whatever wrote the line.
//!
//! `Secret` keeps values out of `Debug` and `Display`, but a provider may echo its key inside
//! an error body ("Incorrect API key provided: sk-…"), a library may print a URL, and a future
//! `tracing` call may forget. So the log writer itself is the last line of defence: each
//! formatted event (text or JSON) is buffered whole and every secret the server resolved at
//! start — provider keys, the JWT secret, the metrics token, from config, key files, systemd
//! credentials or the environment — is replaced by `[redacted]` before a byte reaches stderr.
//!
//! Secrets shorter than `MIN_LEN` characters are not masked: they would blank out ordinary
//! words. Such a secret is reported (without its value) when it is registered.

use crate::secret::Secret;
use aho_corasick::{AhoCorasick, MatchKind};
use std::io::{self, Write};
use std::sync::{Arc, OnceLock, RwLock};
use tracing_subscriber::fmt::MakeWriter;

/// What a masked secret becomes.
pub const MARK: &str = "[redacted]";

/// Secrets shorter than this (in characters) are left alone: masking "abc" everywhere would
/// blank out ordinary words and tell a reader which ones.
pub const MIN_LEN: usize = 4;

/// A set of secrets to mask, shared between whoever registers them and the log writers.
#[derive(Clone, Default)]
pub struct Secrets(Arc<RwLock<Patterns>>);

/// The secrets in every form a log line can spell them, and one automaton over all of them.
#[derive(Default)]
struct Patterns {
    forms: Vec<String>,
    matcher: Option<Arc<AhoCorasick>>,
}

impl Secrets {
    /// The process-wide set that `edgechat serve`'s log writer masks.
    pub fn global() -> &'static Secrets {
        static GLOBAL: OnceLock<Secrets> = OnceLock::new();
        GLOBAL.get_or_init(Secrets::default)
    }

    /// Masks `value` from now on, as written plainly, JSON-escaped (the JSON log format) and
    /// `Debug`-escaped (`field = ?value`). Returns false, masking nothing, when it is shorter
    /// than `MIN_LEN` characters.
    pub fn add(&self, value: &str) -> bool {
        if value.chars().count() < MIN_LEN {
            return false;
        }
        let mut p = self.0.write().unwrap_or_else(|e| e.into_inner());
        let debug = format!("{value:?}");
        let debug = &debug[1..debug.len() - 1];
        for form in [value.to_string(), json_escaped(value), debug.to_string(), json_escaped(debug)]
        {
            if !p.forms.contains(&form) {
                p.forms.push(form);
            }
        }
        // Leftmost-longest: of two secrets where one contains the other, the whole longer one
        // goes, not the shorter one and a leftover tail.
        p.matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&p.forms)
            .ok()
            .map(Arc::new);
        true
    }

    /// `text` with every registered secret replaced by `MARK`; borrowed when there is none.
    pub fn mask<'a>(&self, text: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let matcher = self.0.read().unwrap_or_else(|e| e.into_inner()).matcher.clone();
        match matcher {
            Some(m) if m.is_match(text) => {
                m.replace_all_bytes(text, &vec![MARK; m.patterns_len()]).into()
            }
            _ => text.into(),
        }
    }

    /// `text` masked, as a string (for messages printed outside the log, like a fatal error).
    pub fn mask_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.mask(text.as_bytes())).into_owned()
    }
}

/// `value` as it appears inside a JSON string.
fn json_escaped(value: &str) -> String {
    let quoted = serde_json::to_string(value).unwrap_or_default();
    quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or_default().to_string()
}

/// Registers a secret the server resolved with the process-wide set; `what` names it (never
/// its value) in the warning about one too short to mask.
pub fn register(what: &str, secret: &Secret) {
    if !secret.expose().is_empty() && !Secrets::global().add(secret.expose()) {
        tracing::warn!(
            secret = what,
            "shorter than {MIN_LEN} characters: too short to be masked in logs"
        );
    }
}

/// A `MakeWriter` whose writers mask `secrets` in each event before passing it on.
pub struct Masked<M> {
    inner: M,
    secrets: Secrets,
}

impl Masked<fn() -> io::Stderr> {
    /// Standard error, masking the process-wide set.
    pub fn stderr() -> Self {
        Masked::new(io::stderr as fn() -> io::Stderr, Secrets::global().clone())
    }
}

impl<M> Masked<M> {
    /// Wraps `inner`, masking `secrets`.
    pub fn new(inner: M, secrets: Secrets) -> Self {
        Masked { inner, secrets }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Masked<M> {
    type Writer = MaskingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        MaskingWriter::new(self.inner.make_writer(), self.secrets.clone())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        MaskingWriter::new(self.inner.make_writer_for(meta), self.secrets.clone())
    }
}

/// Collects one event (the formatter writes each whole, then drops the writer) so that a secret
/// is never split across two writes, and masks it on `flush` or drop.
pub struct MaskingWriter<W: Write> {
    inner: W,
    secrets: Secrets,
    buf: Vec<u8>,
}

impl<W: Write> MaskingWriter<W> {
    fn new(inner: W, secrets: Secrets) -> Self {
        MaskingWriter { inner, secrets, buf: Vec::new() }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        self.inner.write_all(&self.secrets.mask(&buf))
    }
}

impl<W: Write> Write for MaskingWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for MaskingWriter<W> {
    fn drop(&mut self) {
        let _ = self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn masked(secrets: &Secrets, text: &str) -> String {
        String::from_utf8(secrets.mask(text.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn every_secret_goes_whatever_its_length_but_tiny_ones_stay() {
        let s = Secrets::default();
        assert!(s.add("sk-test-SECRET123"));
        assert!(s.add("tok1"));
        assert!(!s.add("abc"), "too short to mask");
        let line = "Incorrect API key provided: sk-test-SECRET123; tok1 abc";
        assert_eq!(masked(&s, line), "Incorrect API key provided: [redacted]; [redacted] abc");
        assert!(matches!(s.mask(b"nothing here"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn the_longer_of_two_overlapping_secrets_goes_whole() {
        let s = Secrets::default();
        s.add("abcd");
        s.add("abcdefgh");
        assert_eq!(masked(&s, "x abcdefgh y abcd"), "x [redacted] y [redacted]");
        // A secret that is part of the mark does not eat the mark.
        s.add("redacted");
        assert_eq!(masked(&s, "redacted abcd"), "[redacted] [redacted]");
    }

    #[test]
    fn escaped_forms_are_masked_too() {
        let s = Secrets::default();
        let secret = "pa\"ss\\word\n";
        s.add(secret);
        let json = serde_json::to_string(&serde_json::json!({ "body": secret })).unwrap();
        assert_eq!(masked(&s, &json), r#"{"body":"[redacted]"}"#);
        assert_eq!(masked(&s, &format!("body={secret:?}")), "body=\"[redacted]\"");
        let nested = serde_json::to_string(&format!("{secret:?}")).unwrap();
        assert_eq!(masked(&s, &nested), r#""\"[redacted]\"""#);
    }

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_writer_masks_text_and_json_lines() {
        let secrets = Secrets::default();
        secrets.add("sk-\"q\"-key");
        for json in [false, true] {
            let sink = Sink::default();
            let out = sink.clone();
            let writer = Masked::new(move || out.clone(), secrets.clone());
            let builder = tracing_subscriber::fmt().with_writer(writer).with_ansi(false);
            let dispatch: tracing::Dispatch = match json {
                true => builder.json().finish().into(),
                false => builder.finish().into(),
            };
            tracing::dispatcher::with_default(&dispatch, || {
                let body = "Incorrect API key provided: sk-\"q\"-key";
                tracing::warn!(body = %body, debug = ?body, "upstream refused");
            });
            let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
            assert!(text.contains("upstream refused"), "{text}");
            assert!(!text.contains("q\\\"-key") && !text.contains("q\"-key"), "{text}");
            assert_eq!(text.matches(MARK).count(), 2, "{text}");
        }
    }
}
