//! The pruner: with a [`Retention`] configured, prunes finished runs older than its
//! age every `every`, in batches (`admin::prune`: one instance at a time holds the
//! pruning lock; the others find it busy and wait for their next turn).

use std::sync::Arc;

use tracing::{info, warn};

use crate::Retention;
use crate::admin::{self, PruneOptions};
use crate::engine::{Engine, sleep_or_shutdown};

pub(crate) async fn run(engine: Arc<Engine>, retention: Retention) {
    let mut shutdown = engine.shutdown_rx();
    let options = PruneOptions {
        older_than: retention.after,
        archive: retention.archive,
        dry_run: false,
        batch: retention.batch,
    };
    loop {
        if *shutdown.borrow() {
            return;
        }
        match admin::prune(&engine.pool, options).await {
            Ok(r) if r.runs > 0 => info!(
                runs = r.runs,
                steps = r.steps,
                elements = r.elements,
                archived = r.archived,
                "pgflow: pruned finished runs"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pgflow: pruning finished runs failed; retrying later"),
        }
        sleep_or_shutdown(retention.every, &mut shutdown).await;
    }
}
