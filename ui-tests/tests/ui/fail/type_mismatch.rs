use pgflow::{workflow, StepError};

pub struct Routed;
pub struct Completion;

pub struct Mismatch;

#[workflow]
impl Mismatch {
    #[step]
    async fn route(n: u32) -> Result<String, StepError> {
        Ok(n.to_string())
    }

    #[step]
    async fn call(routed: u64) -> Result<u64, StepError> {
        Ok(routed)
    }
}

fn main() {}
