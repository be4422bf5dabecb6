use pgflow::{workflow, StepError};

pub struct ThreeMistakes;

#[workflow]
impl ThreeMistakes {
    #[step]
    fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [nowhere])]
    async fn b(nowhere: u32) -> Result<u32, StepError> {
        Ok(nowhere)
    }

    #[step(timeout = "soon")]
    async fn c(b: u32) -> Result<u32, StepError> {
        Ok(b)
    }
}

fn main() {}
