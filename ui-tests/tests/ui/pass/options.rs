use std::time::Duration;

use pgflow::{workflow, StepError, Workflow};

pub struct Options;

#[workflow(
    name = "options.v1",
    version = 7,
    queue = "llm",
    max_attempts = 4,
    timeout = "1m30s",
    backoff = "250ms",
    priority = -2
)]
impl Options {
    #[step]
    async fn defaults(n: u8) -> Result<u8, StepError> {
        Ok(n)
    }

    #[step(max_attempts = 9, timeout = "2h", backoff = "0ms", priority = 100)]
    async fn overridden(n: u8) -> Result<u8, StepError> {
        Ok(n)
    }
}

fn main() {
    let def = Options::definition();
    assert_eq!((def.name(), def.version(), def.queue()), ("options.v1", 7, "llm"));
    let d = def.steps()[0].options();
    assert_eq!(
        (d.max_attempts, d.timeout, d.backoff, d.priority),
        (4, Duration::from_secs(90), Duration::from_millis(250), -2)
    );
    let o = def.steps()[1].options();
    assert_eq!(
        (o.max_attempts, o.timeout, o.backoff, o.priority),
        (9, Duration::from_secs(7200), Duration::ZERO, 100)
    );
}
