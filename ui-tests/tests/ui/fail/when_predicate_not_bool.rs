use pgflow::{workflow, StepError};

pub struct Conditional;

#[workflow]
impl Conditional {
    #[step(when = Self::size)]
    async fn a(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    fn size(n: &u32) -> u32 {
        *n
    }
}

fn main() {}
