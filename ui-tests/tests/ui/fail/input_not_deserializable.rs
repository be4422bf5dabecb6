use pgflow::{workflow, StepError};

#[derive(serde::Serialize)]
pub struct OnlySerialize {
    pub n: u32,
}

pub struct InputNotDe;

#[workflow]
impl InputNotDe {
    #[step]
    async fn a(input: OnlySerialize) -> Result<u32, StepError> {
        Ok(input.n)
    }
}

fn main() {}
