use pgflow::{workflow, StepError};

pub struct Review;

#[workflow]
impl Review {
    #[step]
    async fn draft(text: String) -> Result<String, StepError> {
        Ok(text)
    }

    #[step(when = Self::is_long)]
    async fn review(draft: String) -> Result<String, StepError> {
        Ok(draft)
    }

    #[step]
    async fn publish(review: String) -> Result<String, StepError> {
        Ok(review)
    }

    fn is_long(draft: &str) -> bool {
        draft.len() > 100
    }
}

fn main() {}
