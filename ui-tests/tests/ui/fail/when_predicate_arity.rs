use pgflow::{workflow, StepError};

pub struct Review;

#[workflow]
impl Review {
    #[step]
    async fn draft(text: String) -> Result<String, StepError> {
        Ok(text)
    }

    #[step(when = Self::is_long, depends_on = [draft])]
    async fn publish(draft: String, input: String) -> Result<String, StepError> {
        Ok(format!("{draft} ({input})"))
    }

    fn is_long(draft: &str) -> bool {
        draft.len() > 10
    }
}

fn main() {}
