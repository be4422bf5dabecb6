use pgflow::{workflow, StepError};

pub struct UnknownOption;

#[workflow(retries = 3)]
impl UnknownOption {
    #[step(retry = 5)]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
