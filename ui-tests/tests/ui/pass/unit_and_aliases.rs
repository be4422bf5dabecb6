use pgflow::{workflow, StepError};

type StepResult<T> = Result<T, StepError>;
type Pair = (u8, u8);

pub struct Aliases;

#[workflow]
impl Aliases {
    #[step]
    async fn start(input: Pair) -> StepResult<()> {
        let _ = input;
        Ok(())
    }

    #[step]
    async fn next(done: ()) -> Result<Vec<Pair>, StepError> {
        let () = done;
        Ok(vec![(1, 2)])
    }
}

fn main() {}
