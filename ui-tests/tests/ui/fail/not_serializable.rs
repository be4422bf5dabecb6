use pgflow::{workflow, StepError};

pub struct Opaque {
    pub n: u32,
}

pub struct NotSerde;

#[workflow]
impl NotSerde {
    #[step]
    async fn a(n: u32) -> Result<Opaque, StepError> {
        Ok(Opaque { n })
    }

    #[step]
    async fn b(o: Opaque) -> Result<u32, StepError> {
        Ok(o.n)
    }
}

fn main() {}
