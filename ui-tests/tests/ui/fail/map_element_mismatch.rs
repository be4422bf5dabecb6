use pgflow::{workflow, StepError};

pub struct Mapped;

#[workflow]
impl Mapped {
    #[step]
    async fn words(text: String) -> Result<Vec<String>, StepError> {
        Ok(text.split(' ').map(str::to_owned).collect())
    }

    #[step(map)]
    async fn each(word: u32) -> Result<u32, StepError> {
        Ok(word)
    }
}

fn main() {}
