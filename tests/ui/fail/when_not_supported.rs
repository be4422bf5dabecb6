use pgflow::{workflow, StepError};

pub struct Conditional;

#[workflow]
impl Conditional {
    #[step(when = Self::big)]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    fn big(n: &u32) -> bool {
        *n > 10
    }
}

fn main() {}
