//! The registry lists every workflow linked into the binary, including those of
//! another crate of the workspace (`test-workflows`), sorted by (name, version).

// `test-workflows` is only used for its registrations: without this line the crate
// is not linked and its workflows are silently missing (see `pgflow::registry`).
use test_workflows as _;

use pgflow::{StepError, Workflow, workflow};

pub struct Local;

#[workflow(name = "a_local_workflow", version = 3)]
impl Local {
    #[step]
    async fn only(n: u8) -> Result<u8, StepError> {
        Ok(n)
    }
}

#[test]
fn lists_workflows_of_this_crate_and_of_a_linked_crate() {
    let registry = pgflow::registry().unwrap();
    let listed: Vec<(&str, u32)> = registry
        .workflows()
        .iter()
        .map(|d| (d.name(), d.version()))
        .collect();
    assert_eq!(
        listed,
        [
            ("a_local_workflow", 3),
            ("test_word_count", 1),
            ("test_word_count", 2)
        ]
    );
    let v1 = registry.get("test_word_count", 1).unwrap();
    assert_eq!(v1.queue(), "text");
    assert_eq!(v1.rust_type(), "test_workflows::WordCount");
    assert!(
        v1.location().starts_with("test-workflows/src/lib.rs:"),
        "{}",
        v1.location()
    );
    assert_eq!(registry.latest("test_word_count").unwrap().version(), 2);
    assert!(std::ptr::eq(
        registry.get("a_local_workflow", 3).unwrap(),
        Local::definition()
    ));
    assert!(registry.get("a_local_workflow", 1).is_none());
}

#[tokio::test]
async fn a_workflow_from_another_crate_runs_in_process() {
    let n = pgflow::execute::<test_workflows::WordCount>("one two three".to_owned())
        .await
        .unwrap();
    assert_eq!(n, 6);
}
