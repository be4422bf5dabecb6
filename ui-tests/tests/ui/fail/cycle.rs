use pgflow::{workflow, StepError};

pub struct Cycle;

#[workflow]
impl Cycle {
    #[step]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [a, c])]
    async fn b(a: u32, c: u32) -> Result<u32, StepError> {
        Ok(a + c)
    }

    #[step(depends_on = [b])]
    async fn c(b: u32) -> Result<u32, StepError> {
        Ok(b)
    }
}

fn main() {}
