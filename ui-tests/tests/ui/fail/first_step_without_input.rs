use pgflow::{workflow, StepError};

pub struct NoInput;

#[workflow]
impl NoInput {
    #[step]
    async fn a() -> Result<u32, StepError> {
        Ok(1)
    }
}

fn main() {}
