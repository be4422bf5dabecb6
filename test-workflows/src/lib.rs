//! Workflows defined in a crate of their own: the registry test links this crate
//! and checks that its workflows are listed (the `inventory` linking pitfall).

use pgflow::{StepError, workflow};

/// Counts the words of a text, then doubles the count.
pub struct WordCount;

#[workflow(name = "test_word_count", queue = "text")]
impl WordCount {
    #[step]
    async fn count(text: String) -> Result<usize, StepError> {
        Ok(text.split_whitespace().count())
    }

    #[step]
    async fn double(n: usize) -> Result<usize, StepError> {
        Ok(n * 2)
    }
}

/// Version 2 of [`WordCount`]'s name, defined by another type.
pub struct WordCountV2;

#[workflow(name = "test_word_count", version = 2, queue = "text")]
impl WordCountV2 {
    #[step]
    async fn count(text: String) -> Result<u64, StepError> {
        Ok(text.split_whitespace().count() as u64)
    }
}
