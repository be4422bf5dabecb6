use pgflow::{workflow, StepError};

pub struct TwoEnds;

#[workflow]
impl TwoEnds {
    #[step]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [a])]
    async fn b(a: u32) -> Result<u32, StepError> {
        Ok(a)
    }

    #[step(depends_on = [a])]
    async fn c(a: u32) -> Result<u32, StepError> {
        Ok(a)
    }
}

fn main() {}
