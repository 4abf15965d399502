//! The signals a serving process answers. Every signal whose default action would end the
//! process is caught, so that nothing but SIGKILL ends it undrained: SIGTERM, SIGINT and
//! SIGQUIT drain and stop, SIGHUP reloads what can be reloaded without dropping connections,
//! and the rest whose default is to end the process (SIGUSR1, SIGUSR2, SIGALRM, SIGIO,
//! SIGPROF, SIGVTALRM, SIGPWR, SIGXCPU, SIGXFSZ) are logged and ignored. SIGPIPE is ignored by
//! the Rust runtime already.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a caught signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Stop accepting, drain, exit.
    Stop,
    /// Reload the TLS certificate and key.
    Reload,
}

const STOP: [(SignalKind, &str); 3] = [
    (SignalKind::terminate(), "SIGTERM"),
    (SignalKind::interrupt(), "SIGINT"),
    (SignalKind::quit(), "SIGQUIT"),
];
const IGNORED: [(SignalKind, &str); 9] = [
    (SignalKind::user_defined1(), "SIGUSR1"),
    (SignalKind::user_defined2(), "SIGUSR2"),
    (SignalKind::alarm(), "SIGALRM"),
    (SignalKind::io(), "SIGIO"),
    (SignalKind::from_raw(libc::SIGPROF), "SIGPROF"),
    (SignalKind::from_raw(libc::SIGVTALRM), "SIGVTALRM"),
    (SignalKind::from_raw(libc::SIGPWR), "SIGPWR"),
    (SignalKind::from_raw(libc::SIGXCPU), "SIGXCPU"),
    // A file past `LimitFSIZE`: the write then fails with EFBIG, which the store treats as an
    // I/O error it recovers from, instead of the signal ending the process.
    (SignalKind::from_raw(libc::SIGXFSZ), "SIGXFSZ"),
];

/// The handlers, installed from the moment this is made: make it before announcing that the
/// server listens, or a signal sent right after the announcement ends the process undrained.
pub struct Signals {
    handlers: Vec<(Signal, &'static str, Option<Request>)>,
}

impl Signals {
    /// Installs the handlers (inside the runtime). One that cannot be installed is logged;
    /// its signal then keeps its default action.
    pub fn install() -> Signals {
        let stop = STOP.map(|(k, n)| (k, n, Some(Request::Stop)));
        let reload = [(SignalKind::hangup(), "SIGHUP", Some(Request::Reload))];
        let ignored = IGNORED.map(|(k, n)| (k, n, None));
        let handlers = stop
            .into_iter()
            .chain(reload)
            .chain(ignored)
            .filter_map(|(kind, name, request)| match signal(kind) {
                Ok(s) => Some((s, name, request)),
                Err(e) => {
                    tracing::warn!(signal = name, error = %e, "cannot handle this signal");
                    None
                }
            })
            .collect();
        Signals { handlers }
    }

    /// Resolves at the next signal that asks for something, logging every signal it sees.
    pub async fn next(&mut self) -> Request {
        if self.handlers.is_empty() {
            // Without handlers the server can still be stopped by SIGKILL; never exit early.
            return std::future::pending().await;
        }
        loop {
            let (name, request) = self.any().await;
            match request {
                Some(r) => {
                    tracing::info!(signal = name, "{name} received");
                    return r;
                }
                None => tracing::info!(signal = name, "{name} received and ignored"),
            }
        }
    }

    /// Resolves at the next stop request; reloads asked for meanwhile are ignored (used while
    /// draining, when a second stop means "now").
    pub async fn next_stop(&mut self) {
        while self.next().await != Request::Stop {}
    }

    async fn any(&mut self) -> (&'static str, Option<Request>) {
        let waits = self.handlers.iter_mut().map(|(s, name, request)| {
            let (name, request) = (*name, *request);
            Box::pin(async move {
                s.recv().await;
                (name, request)
            })
        });
        futures_util::future::select_all(waits).await.0
    }
}
