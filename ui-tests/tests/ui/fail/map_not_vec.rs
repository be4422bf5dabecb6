use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    #[step]
    async fn count(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(map)]
    async fn each(count: u32) -> Result<u32, StepError> {
        Ok(count)
    }
}

fn main() {}
