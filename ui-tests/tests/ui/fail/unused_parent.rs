use pgflow::{workflow, StepError};

pub struct Unused;

#[workflow]
impl Unused {
    #[step]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [a])]
    async fn b(a: u32) -> Result<u32, StepError> {
        Ok(a)
    }

    #[step(depends_on = [a, b])]
    async fn c(b: u32) -> Result<u32, StepError> {
        Ok(b)
    }
}

fn main() {}
