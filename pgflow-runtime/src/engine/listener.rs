//! The listener: turns `NOTIFY pgflow_tasks` (payload: the queue) into local
//! wake-ups of that queue's claimer. Reconnects on its own; after (re)connecting it
//! wakes every claimer, since notifications may have been missed meanwhile.

use std::sync::Arc;

use tracing::warn;

use crate::engine::{Backoff, Engine, sleep_or_shutdown};
use crate::store::notify::CHANNEL;

pub(crate) async fn run(engine: Arc<Engine>) {
    let mut shutdown = engine.shutdown_rx();
    let mut backoff = Backoff::new();
    while !*shutdown.borrow() {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&engine.pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "pgflow: cannot LISTEN; polling until it can");
                sleep_or_shutdown(backoff.next(), &mut shutdown).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            warn!(error = %e, "pgflow: LISTEN failed");
            sleep_or_shutdown(backoff.next(), &mut shutdown).await;
            continue;
        }
        backoff.reset();
        engine.wake_all();
        loop {
            tokio::select! {
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => engine.wake_queue(n.payload()),
                    Ok(None) => engine.wake_all(),
                    Err(e) => {
                        warn!(error = %e, "pgflow: LISTEN connection lost; reconnecting");
                        break;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}
