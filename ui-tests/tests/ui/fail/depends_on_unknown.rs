use pgflow::{workflow, StepError};

pub struct Unknown;

#[workflow]
impl Unknown {
    #[step]
    async fn fetch(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [fecth])]
    async fn parse(fecth: u32) -> Result<u32, StepError> {
        Ok(fecth)
    }
}

fn main() {}
