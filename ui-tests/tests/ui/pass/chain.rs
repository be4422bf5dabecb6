use pgflow::{workflow, StepError, Workflow};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct Request {
    pub prompt: String,
}

#[derive(Serialize, Deserialize)]
pub struct Routed {
    pub model: String,
}

pub struct Chain;

#[workflow]
impl Chain {
    #[step]
    async fn route(req: Request) -> Result<Routed, StepError> {
        Ok(Routed { model: req.prompt })
    }

    #[step]
    async fn call(routed: Routed) -> Result<String, std::io::Error> {
        Ok(routed.model)
    }

    #[step]
    async fn len(text: String, input: Request) -> Result<usize, StepError> {
        Ok(text.len() + input.prompt.len())
    }
}

fn main() {
    fn is_workflow<W: Workflow<Input = Request, Output = usize>>() {}
    is_workflow::<Chain>();
    assert_eq!(Chain::NAME, "chain");
}
