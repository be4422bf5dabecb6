use pgflow::{workflow, StepError};

pub struct Triangle;

#[workflow]
impl Triangle {
    #[step]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [a, d])]
    async fn b(a: u32, d: u32) -> Result<u32, StepError> {
        Ok(a + d)
    }

    #[step(depends_on = [b])]
    async fn c(b: u32) -> Result<u32, StepError> {
        Ok(b)
    }

    #[step(depends_on = [c])]
    async fn d(c: u32) -> Result<u32, StepError> {
        Ok(c)
    }
}

fn main() {}
