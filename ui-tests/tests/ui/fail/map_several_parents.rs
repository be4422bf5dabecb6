use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    #[step(depends_on = [])]
    async fn a(input: u32) -> Result<Vec<u32>, StepError> {
        Ok(vec![input])
    }

    #[step(depends_on = [])]
    async fn b(input: u32) -> Result<u32, StepError> {
        Ok(input)
    }

    #[step(depends_on = [a, b], map)]
    async fn each(a: u32, b: u32) -> Result<u32, StepError> {
        Ok(a + b)
    }
}

fn main() {}
