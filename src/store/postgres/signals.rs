//! Wake-ups across replicas: an enqueue (or a rescue) runs `pg_notify` in its transaction, and
//! every replica's `JobSignals` holds one connection of its own that `LISTEN`s, so idle
//! workers anywhere start at once instead of polling the queue.

use super::jobs::CHANNEL;
use super::Pg;
use futures_util::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// After a lost connection, how long to wait before listening again (doubling to the cap).
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Notifications on the job channel, over a connection outside the pool that comes back by
/// itself after the database does.
pub struct JobSignals {
    pg: Pg,
    /// The listening connection's client (dropping it closes the connection) and what its
    /// driver forwards; `None` while not connected.
    live: Option<(tokio_postgres::Client, mpsc::UnboundedReceiver<()>)>,
    retry: Duration,
}

impl JobSignals {
    pub(in crate::store) fn new(pg: Pg) -> JobSignals {
        JobSignals { pg, live: None, retry: RETRY_FIRST }
    }

    /// Resolves at the next notification, or once listening (again) after a connection was
    /// lost, since a notification may have been missed meanwhile.
    pub async fn next(&mut self) {
        loop {
            let Some((_, rx)) = self.live.as_mut() else {
                match self.listen().await {
                    Ok(live) => {
                        self.live = Some(live);
                        self.retry = RETRY_FIRST;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "listening for jobs failed; trying again");
                        tokio::time::sleep(self.retry).await;
                        self.retry = (self.retry * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            };
            match rx.recv().await {
                Some(()) => return,
                None => self.live = None,
            }
        }
    }

    async fn listen(
        &self,
    ) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<()>), tokio_postgres::Error> {
        let (config, tls) = &*self.pg.connect_with;
        let (client, mut connection) = config.connect(tls.clone()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(_) = message {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            }
        });
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        Ok((client, rx))
    }
}
