use pgflow::{workflow, StepError};

pub struct Generic;

#[workflow]
impl Generic {
    #[step]
    async fn a<T: Send>(n: T) -> Result<T, StepError> {
        Ok(n)
    }
}

fn main() {}
