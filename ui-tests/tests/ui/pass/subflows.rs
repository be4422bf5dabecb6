//! Subflows: a single step, a map step over child runs, a conditional one (its
//! children take `Option<W::Output>`), a path-qualified `pgflow::Subflow`, a
//! workflow that runs itself (`Subflow<Self>`), and a subflow as the terminal step
//! (the workflow's output is the child's).
use pgflow::{workflow, StepError, Subflow, Workflow};

pub struct Leaf;

#[workflow]
impl Leaf {
    #[step]
    async fn double(n: u32) -> Result<u32, StepError> {
        Ok(n * 2)
    }
}

pub struct Tree;

#[workflow]
impl Tree {
    #[step]
    async fn one(n: u32) -> Result<Subflow<Leaf>, StepError> {
        Ok(Subflow::new(n))
    }

    #[step]
    async fn spread(one: u32) -> Result<Vec<u32>, StepError> {
        Ok(vec![one; 3])
    }

    #[step(map)]
    async fn each(n: u32) -> Result<pgflow::Subflow<Leaf>, StepError> {
        Ok(Subflow::new(n))
    }

    #[step(when = Self::big)]
    async fn maybe(each: Vec<u32>) -> Result<Subflow<Leaf>, StepError> {
        Ok(Subflow::new(each.iter().sum()))
    }

    #[step]
    async fn last(maybe: Option<u32>) -> Result<Subflow<Leaf>, StepError> {
        Ok(Subflow::new(maybe.unwrap_or(0)))
    }

    fn big(each: &[u32]) -> bool {
        each.len() > 2
    }
}

pub struct Countdown;

#[workflow]
impl Countdown {
    #[step(when = Self::positive)]
    async fn step_down(n: u32) -> Result<Subflow<Self>, StepError> {
        Ok(Subflow::new(n - 1))
    }

    #[step]
    async fn done(step_down: Option<u32>) -> Result<u32, StepError> {
        Ok(step_down.map_or(0, |n| n + 1))
    }

    fn positive(n: &u32) -> bool {
        *n > 0
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    assert_eq!(rt.block_on(pgflow::execute::<Countdown>(3)).unwrap(), 3);
    assert_eq!(rt.block_on(pgflow::execute::<Tree>(1)).unwrap(), 48);
    let def = Tree::definition();
    assert_eq!(def.step("one").unwrap().subflow().unwrap().name(), "leaf");
    assert_eq!(def.step("each").unwrap().output().type_name, "Vec<Leaf::Output>");
    let _: fn() -> <Tree as Workflow>::Output = || 0_u32;
    assert_eq!(Countdown::definition().step("step_down").unwrap().subflow().unwrap().name(), "countdown");
}
