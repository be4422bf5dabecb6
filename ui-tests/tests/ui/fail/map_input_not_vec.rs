use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    #[step(depends_on = [])]
    async fn first(input: u32) -> Result<u32, StepError> {
        Ok(input)
    }

    /// A root map step maps over the workflow input, which is a `u32` here.
    #[step(depends_on = [], map)]
    async fn each(input: u32) -> Result<u32, StepError> {
        Ok(input)
    }

    #[step(depends_on = [first, each])]
    async fn last(first: u32, each: Vec<u32>) -> Result<u32, StepError> {
        Ok(first + each.len() as u32)
    }
}

fn main() {}
