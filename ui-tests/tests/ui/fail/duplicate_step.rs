use pgflow::{workflow, StepError};

pub struct Duplicate;

#[workflow]
impl Duplicate {
    #[step]
    async fn load(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step]
    async fn load(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
