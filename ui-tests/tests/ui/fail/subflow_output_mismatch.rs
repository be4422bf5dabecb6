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
    #[step]
    async fn research(topic: String) -> Result<Subflow<Research>, StepError> {
        Ok(Subflow::new(topic))
    }

    // The child's output is a `usize`.
    #[step]
    async fn write(research: String) -> Result<String, StepError> {
        Ok(research)
    }
}

fn main() {}
