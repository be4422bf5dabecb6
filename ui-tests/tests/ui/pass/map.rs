use pgflow::{workflow, StepContext, StepError, Workflow};

pub type Words = Vec<String>;

pub struct Mapped;

#[workflow]
impl Mapped {
    /// A root map step: the workflow input is a `Vec<String>`.
    #[step(map)]
    async fn trim(text: String) -> Result<String, StepError> {
        Ok(text.trim().to_owned())
    }

    #[step]
    async fn words(lines: Vec<String>) -> Result<Words, StepError> {
        Ok(lines.iter().flat_map(|l| l.split(' ')).map(str::to_owned).collect())
    }

    /// Maps over a type alias of a `Vec`, with the context and the input.
    #[step(map)]
    async fn len(word: String, input: Vec<String>, ctx: &StepContext) -> Result<usize, StepError> {
        assert!(ctx.element().is_some());
        Ok(word.len() + input.len() * 0)
    }

    /// Maps over a map step's output.
    #[step(map)]
    async fn double(len: usize) -> Result<usize, StepError> {
        Ok(len * 2)
    }
}

fn main() {
    fn is_workflow<W: Workflow<Input = Vec<String>, Output = Vec<usize>>>() {}
    is_workflow::<Mapped>();
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let out = rt.block_on(pgflow::execute::<Mapped>(vec![" a bc ".into(), "def".into()]));
    assert_eq!(out.unwrap(), [2, 4, 6]);
}
