//! systemd's service protocol (`sd_notify`): `READY=1` once the server can answer, `WATCHDOG=1`
//! while it provably still can, `STOPPING=1` when it drains. Each message is one datagram to
//! `$NOTIFY_SOCKET`; without that variable (not under systemd) every call does nothing.

use crate::store::Store;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager, when there is one.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` of this process.
    pub fn from_env() -> Option<Notifier> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self::new(var("NOTIFY_SOCKET")?, var("WATCHDOG_USEC"), var("WATCHDOG_PID"))
    }

    fn new(socket: String, usec: Option<String>, pid: Option<String>) -> Option<Notifier> {
        let addr = match socket.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&socket),
        };
        let addr =
            addr.map_err(|e| tracing::warn!(socket, error = %e, "bad NOTIFY_SOCKET")).ok()?;
        let socket = UnixDatagram::unbound()
            .map_err(|e| tracing::warn!(error = %e, "cannot open a socket for sd_notify"))
            .ok()?;
        // A watchdog meant for another process (WATCHDOG_PID) is not ours to feed.
        let ours = pid.is_none_or(|p| p.parse() == Ok(std::process::id()));
        let watchdog = usec
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Some(Notifier { socket, addr, watchdog })
    }

    /// Sends one state change (`READY=1`, `STATUS=…`, newline-separated for several).
    pub fn notify(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Pings the watchdog for as long as the runtime schedules this task and the store both
    /// reads and takes its write lock within one interval; a wedged process stops pinging and
    /// systemd restarts it. A store that cannot write because the disk is full is not wedged:
    /// it recovers by itself once there is room, and a restart would not make any. So the
    /// pings go on (`Store::heartbeat` checks its recovery is moving instead), and the
    /// trouble shows in `STATUS=` (`systemctl status`) and in one log line.
    pub async fn keep_alive(self: std::sync::Arc<Self>, store: Store) {
        let Some(every) = self.watchdog_interval() else { return };
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut degraded = false;
        loop {
            ticks.tick().await;
            let probe = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.heartbeat())
            };
            match tokio::time::timeout(every, probe).await {
                Ok(Ok(Ok(()))) => {
                    let status = store.writable().err();
                    let ping = match (&status, degraded) {
                        (Some(e), _) => format!("WATCHDOG=1\nSTATUS=degraded: {e}"),
                        (None, true) => "WATCHDOG=1\nSTATUS=serving; storage writable again".into(),
                        (None, false) => "WATCHDOG=1".into(),
                    };
                    degraded = status.is_some();
                    self.notify(&ping);
                }
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "watchdog: store check failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "watchdog: store check panicked"),
                Err(_) => tracing::error!(?every, "watchdog: store check took too long"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_usec_and_pid() {
        let n = |usec: Option<&str>, pid: Option<String>| {
            Notifier::new("/run/x".into(), usec.map(String::from), pid).unwrap()
        };
        assert_eq!(n(Some("2000000"), None).watchdog_interval(), Some(Duration::from_secs(1)));
        let me = std::process::id().to_string();
        assert_eq!(n(Some("2000000"), Some(me)).watchdog_interval(), Some(Duration::from_secs(1)));
        assert_eq!(n(Some("2000000"), Some("1".into())).watchdog_interval(), None);
        assert_eq!(n(Some("0"), None).watchdog_interval(), None);
        assert_eq!(n(None, None).watchdog_interval(), None);
    }

    #[test]
    fn abstract_sockets_are_understood() {
        let n = Notifier::new("@edgechat-test".into(), None, None).unwrap();
        assert_eq!(n.addr.as_abstract_name(), Some(&b"edgechat-test"[..]));
    }
}
