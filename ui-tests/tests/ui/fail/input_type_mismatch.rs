use pgflow::{workflow, StepError};

pub struct InputMismatch;

#[workflow]
impl InputMismatch {
    #[step]
    async fn first(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step]
    async fn second(prev: u32, input: String) -> Result<String, StepError> {
        Ok(format!("{prev}{input}"))
    }
}

fn main() {}
