use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    #[step(when = Self::is_big)]
    async fn all(n: u32) -> Result<Vec<u32>, StepError> {
        Ok((0..n).collect())
    }

    #[step(map)]
    async fn each(all: u32) -> Result<u32, StepError> {
        Ok(all)
    }

    fn is_big(n: &u32) -> bool {
        *n > 10
    }
}

fn main() {}
