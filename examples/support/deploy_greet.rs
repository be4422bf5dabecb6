//! Shared by the `deploy_v1` and `deploy_v2` examples: version 1 of the
//! `deploy_greet` workflow (which both binaries link) and the serving loop.

use std::time::Duration;

use pgflow::{StepError, workflow};
use pgflow_runtime::Runtime;

/// How long each step takes, so that a deploy happens while runs are in flight.
pub const STEP_TIME: Duration = Duration::from_millis(50);

/// Version 1, as first deployed.
pub struct GreetV1;

#[workflow(name = "deploy_greet", version = 1, queue = "deploy")]
impl GreetV1 {
    #[step]
    async fn greet(name: String) -> Result<String, StepError> {
        tokio::time::sleep(STEP_TIME).await;
        Ok(format!("hello {name}"))
    }

    #[step]
    async fn sign(greet: String) -> Result<String, StepError> {
        tokio::time::sleep(STEP_TIME).await;
        Ok(format!("{greet} (v1)"))
    }
}

/// Serves queue `deploy` with `concurrency` slots (every linked version of
/// `deploy_greet`) until SIGTERM or SIGINT, printing `ready` once serving and
/// `stopped` after the graceful shutdown.
pub async fn serve(concurrency: usize) -> Result<(), pgflow_runtime::Error> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut builder = Runtime::builder()
        .database_url(url)
        .queue("deploy", concurrency)
        .poll_interval(Duration::from_millis(50))
        .heartbeat_interval(Duration::from_millis(200));
    if let Ok(id) = std::env::var("INSTANCE_ID") {
        builder = builder.instance_id(id);
    }
    let rt = builder.start().await?;
    println!("ready {}", rt.instance_id());
    rt.run_until_signal().await?;
    println!("stopped {}", rt.instance_id());
    Ok(())
}
