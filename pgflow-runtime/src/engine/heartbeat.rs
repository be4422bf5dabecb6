//! The heartbeat: every `heartbeat_interval`, this instance's row gets the time and
//! its load (steps executing now).
//!
//! It keeps beating during a graceful shutdown's drain (shutdown stops it right
//! before marking the instance offline), so a long drain is not mistaken for death.

use std::sync::Arc;

use tracing::warn;

use crate::engine::Engine;
use crate::store::instances;

pub(crate) async fn run(engine: Arc<Engine>) {
    loop {
        tokio::time::sleep(engine.config.heartbeat_interval).await;
        let load = engine.in_flight.lock().map_or(0, |m| m.len());
        if let Err(e) = instances::heartbeat(&engine.pool, &engine.instance_id, load).await {
            warn!(error = %e, "pgflow: heartbeat failed");
        }
    }
}
