use pgflow::{workflow, StepError, Workflow};

pub struct Conditional;

#[workflow]
impl Conditional {
    #[step]
    async fn score(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(when = Self::is_high)]
    async fn escalate(score: u32, input: u32) -> Result<String, StepError> {
        Ok(format!("{score}/{input}"))
    }

    #[step(depends_on = [score, escalate], when = is_unusual)]
    async fn note(score: u32, escalate: Option<String>) -> Result<String, StepError> {
        Ok(escalate.unwrap_or_else(|| score.to_string()))
    }

    fn is_high(score: &u32, input: &u32) -> bool {
        *score > 10 && *input > 10
    }
}

/// A predicate outside the impl block, on references to the step's inputs.
fn is_unusual(score: &u32, escalate: &Option<String>) -> bool {
    *score != 7 || escalate.is_some()
}

fn main() {
    // The terminal step is conditional: the workflow's output is an `Option`.
    fn is_workflow<W: Workflow<Input = u32, Output = Option<String>>>() {}
    is_workflow::<Conditional>();
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    assert_eq!(rt.block_on(pgflow::execute::<Conditional>(20)).unwrap().as_deref(), Some("20/20"));
    assert_eq!(rt.block_on(pgflow::execute::<Conditional>(3)).unwrap().as_deref(), Some("3"));
    assert_eq!(rt.block_on(pgflow::execute::<Conditional>(7)).unwrap(), None);
}
