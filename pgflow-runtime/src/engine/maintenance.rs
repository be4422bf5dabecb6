//! The maintainer: keeps the hot tables small by vacuuming `pgflow.tasks` (and the
//! other pgflow tables) once enough rows died. The queue deletes every finished task
//! and rewrites claimed ones, so without vacuum the claim index fills with dead
//! entries and throughput decays; this does not rely on the server's autovacuum
//! being on or quick enough.

use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use crate::engine::{Engine, sleep_or_shutdown};
use crate::store::maintenance::{self, VACUUMED};

pub(crate) async fn run(engine: Arc<Engine>) {
    let Some(interval) = engine.config.vacuum_interval else {
        return;
    };
    let mut shutdown = engine.shutdown_rx();
    loop {
        sleep_or_shutdown(interval, &mut shutdown).await;
        if *shutdown.borrow() {
            return;
        }
        let dead = match maintenance::dead_rows(&engine.pool).await {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, "pgflow: reading table statistics failed");
                continue;
            }
        };
        for t in VACUUMED {
            let n = dead
                .iter()
                .find(|(name, _)| name == t.table)
                .map_or(0, |d| d.1);
            if n < t.threshold {
                continue;
            }
            let started = Instant::now();
            match maintenance::vacuum(&engine.pool, t).await {
                Ok(()) => debug!(
                    table = t.table,
                    dead = n,
                    ms = started.elapsed().as_millis() as u64,
                    "pgflow: vacuumed"
                ),
                Err(e) => debug!(table = t.table, error = %e, "pgflow: vacuum failed"),
            }
        }
    }
}
