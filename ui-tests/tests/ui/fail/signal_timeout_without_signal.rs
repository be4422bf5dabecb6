use pgflow::{workflow, StepError};

pub struct Review;

#[workflow]
impl Review {
    #[step(signal_timeout = "72h")]
    async fn publish(draft: String) -> Result<String, StepError> {
        Ok(draft)
    }
}

fn main() {}
