use pgflow::{workflow, StepError};

pub struct NamedInput;

#[workflow]
impl NamedInput {
    #[step]
    async fn input(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [input])]
    async fn b(input: u32) -> Result<u32, StepError> {
        Ok(input)
    }
}

fn main() {}
