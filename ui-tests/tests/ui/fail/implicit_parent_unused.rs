use pgflow::{workflow, StepError};

pub struct Ignores;

#[workflow]
impl Ignores {
    #[step]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step]
    async fn b(input: u32) -> Result<u32, StepError> {
        Ok(input)
    }
}

fn main() {}
