//! The "old binary" of a rolling deploy: links version 1 of `deploy_greet` only and
//! serves its queue until SIGTERM. `deploy_v2` is the new binary. The test
//! `tests/processes.rs` runs both against one database: the old one is stopped while
//! runs of version 1 are in flight, and the new one finishes them.
//!
//! ```text
//! DATABASE_URL=postgres://.. INSTANCE_ID=old cargo run --example deploy_v1
//! ```

#[path = "support/deploy_greet.rs"]
mod deploy_greet;

#[tokio::main]
async fn main() {
    if let Err(e) = deploy_greet::serve(4).await {
        eprintln!("deploy_v1: {e}");
        std::process::exit(1);
    }
}
