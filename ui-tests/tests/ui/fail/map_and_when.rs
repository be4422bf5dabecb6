use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    #[step]
    async fn all(n: u32) -> Result<Vec<u32>, StepError> {
        Ok((0..n).collect())
    }

    #[step(map, when = Self::is_even)]
    async fn each(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    fn is_even(n: &u32) -> bool {
        n % 2 == 0
    }
}

fn main() {}
