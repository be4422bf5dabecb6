use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    #[step(map = true)]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

fn main() {}
