use pgflow::{step, StepError};

pub struct NotAWorkflow;

impl NotAWorkflow {
    #[step]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
