use pgflow::{workflow, StepError};

pub struct Receiver;

#[workflow]
impl Receiver {
    #[step]
    async fn a(&self, n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
