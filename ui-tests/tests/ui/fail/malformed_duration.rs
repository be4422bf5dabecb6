use pgflow::{workflow, StepError};

pub struct BadDuration;

#[workflow(timeout = "30 sekunden")]
impl BadDuration {
    #[step(backoff = "5", timeout = "0s")]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
