//! The "new binary" of a rolling deploy: links versions 1 and 2 of `deploy_greet`, so
//! it finishes the runs pinned to version 1 while new starts (by name, without a
//! version: the highest registered one) get version 2. See `deploy_v1`.
//!
//! ```text
//! DATABASE_URL=postgres://.. INSTANCE_ID=new cargo run --example deploy_v2
//! ```

use pgflow::{StepError, workflow};

#[path = "support/deploy_greet.rs"]
mod deploy_greet;

use deploy_greet::STEP_TIME;

/// Version 2: signs differently. Runs started on version 1 stay on version 1.
pub struct GreetV2;

#[workflow(name = "deploy_greet", version = 2, queue = "deploy")]
impl GreetV2 {
    #[step]
    async fn greet(name: String) -> Result<String, StepError> {
        tokio::time::sleep(STEP_TIME).await;
        Ok(format!("hello {name}"))
    }

    #[step]
    async fn sign(greet: String) -> Result<String, StepError> {
        tokio::time::sleep(STEP_TIME).await;
        Ok(format!("{greet} (v2)"))
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = deploy_greet::serve(8).await {
        eprintln!("deploy_v2: {e}");
        std::process::exit(1);
    }
}
