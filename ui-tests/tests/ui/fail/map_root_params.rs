use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    /// The first step takes the workflow input twice: as the element and as `input`.
    #[step(map)]
    async fn each(n: u32, input: Vec<u32>) -> Result<u32, StepError> {
        Ok(n + input.len() as u32)
    }
}

fn main() {}
