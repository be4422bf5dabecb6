use pgflow::{workflow, StepError, Subflow};

pub struct Plain;

pub struct Report;

#[workflow]
impl Report {
    // `Plain` has no `#[workflow]` impl.
    #[step]
    async fn research(topic: String) -> Result<Subflow<Plain>, StepError> {
        Ok(Subflow::new(topic))
    }
}

fn main() {}
