use pgflow::{workflow, StepError, Subflow};

pub struct Research;

#[workflow]
impl Research {
    #[step]
    async fn count(topic: String) -> Result<usize, StepError> {
        Ok(topic.len())
    }
}

pub struct Report;

#[workflow]
impl Report {
    // The child takes a `String`.
    #[step]
    async fn research(n: u32) -> Result<Subflow<Research>, StepError> {
        Ok(Subflow::new(n))
    }
}

fn main() {}
