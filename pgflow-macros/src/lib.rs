//! The `#[workflow]` and `#[step]` attributes of pgflow. Use them through the
//! `pgflow` crate (`use pgflow::workflow;`), whose docs have the full guide; the
//! expansion names `::pgflow` paths only.
//!
//! The work is split like serde_derive's: `attr` parses options, `workflow::parse`
//! builds a model of the impl block, `workflow::check` validates it across steps
//! (accumulating every error) and `workflow::expand` generates code from a valid
//! model. On error the user's items are still emitted, next to the errors.

mod attr;
mod ctxt;
mod paths;
mod workflow;

use proc_macro::TokenStream;

/// Turns an `impl` block into a workflow whose step graph the compiler checks.
///
/// Each `#[step]` is an `async fn` returning `Result<T, E>` with
/// `E: Into<pgflow::StepError>`, taking its data parameters and optionally a
/// `&StepContext`. `#[step]` needs no import: `#[workflow]` reads and removes the
/// markers before name resolution (so `use pgflow::step;` would be an unused
/// import).
///
/// # Graph rules
///
/// - Without `depends_on`, a step depends on the step declared just before it, and
///   its one parameter (other than `input`) takes that step's output; the first
///   step's parameter takes the workflow input.
/// - `#[step(depends_on = [a, b])]` names the parents: parameters bind **by name**
///   to their outputs. `depends_on = []` declares a root step.
/// - A parameter named `input` takes the workflow input in any step.
/// - Exactly one step is terminal (nothing depends on it); its output is the
///   workflow's output. Cycles, unknown or duplicate names, unused parents and
///   unbound parameters are compile errors.
/// - Types are checked by rustc: a parameter whose type is not its parent's output
///   type is reported at the parameter ("expected `Routed`, found `Completion`").
///
/// # Conditional steps: `#[step(when = Self::predicate)]`
///
/// - The predicate is a plain `fn` over references to the step's data inputs, in
///   parameter order (`fn needs_review(draft: &Draft, input: &Request) -> bool`);
///   rustc checks its signature at the path you wrote. `Self::f` and free functions
///   both work.
/// - When it returns `false` the step is *skipped*: its body never runs (the durable
///   runtime records it as `skipped`, with the reason).
/// - A parameter bound to a conditional step takes `Option<T>` (`None` when it was
///   skipped); taking `T` is a compile error at that parameter.
/// - A step whose parents were all skipped still runs, with every such parameter
///   `None` (give it a `when` of its own to skip it too: skips chain that way).
/// - When the terminal step is conditional, the workflow's `Output` is `Option<T>`:
///   `None` when it was skipped. (Stored as JSON, `Some(x)` whose `x` serializes to
///   `null` reads back as `None`, as for any `Option<Option<_>>` in serde_json.)
///
/// # Map steps: `#[step(map)]`
///
/// - A map step maps over the `Vec<T>` output of its single parent, or, as a root
///   step, over the workflow input (which is then `Vec<T>`). Its parameter bound to
///   that parent takes one `T`; it may also take `input` and `&StepContext`
///   (`ctx.element()` is the element's index).
/// - Each element is its own task: elements run in parallel (across instances, in
///   the durable runtime) and are retried on their own.
/// - Its children see `Vec<U>` (`U` being what the body returns), in element order;
///   an empty vector completes the step with `[]` without running the body.
/// - An element that exhausts its attempts fails the step and the run with
///   `RunError::StepFailed { element: Some(index), .. }`.
/// - Compile errors: a source that is not a `Vec` (at `map`), a map step with
///   several parents, over a conditional step, combined with `when`, or a root map
///   step with other than one data parameter.
///
/// # Signals
///
/// `#[step(signal = approval)]`: after its parents complete, the step waits (holding
/// no worker slot) until its run receives the signal `approval`; the data parameter
/// named `approval` takes the payload. With `signal_timeout = "72h"` it stops waiting
/// after that long, and the parameter is an `Option` (`None` then).
/// - The expansion adds one constant per signal to the workflow type,
///   `Review::approval: pgflow::Signal<Review, Approval>`, which the senders take
///   (`rt.signal(run, Review::approval, payload)`), so a payload of the wrong type
///   does not compile.
/// - Compile errors: no parameter named after the signal, `signal_timeout` without
///   `signal`, a timeout with a parameter that is not an `Option` (or an `Option`
///   without a timeout), a signal on a map step, two steps waiting for one signal.
///
/// # Options
///
/// Workflow: `name` (default: the type name in snake_case; it is the durable
/// identity), `version` (1), `queue` (`"default"`), `max_attempts` (3), `timeout`
/// (`"30s"`), `backoff` (`"1s"`), `priority` (0), `max_snoozes` (1000). Steps:
/// `max_attempts`, `timeout`, `backoff`, `priority`, `max_snoozes`, `delay` (due that
/// long after the parents complete; `"0s"`), `signal = name`, `signal_timeout`
/// (none: waits forever), `depends_on`, `when = path::to::predicate`, and the flag
/// `map`. Durations are strings like `"500ms"`,
/// `"30s"`, `"1m30s"`, `"2h"`.
///
/// # Examples
///
/// ```ignore
/// use pgflow::{workflow, StepContext, StepError};
///
/// pub struct Review;
///
/// #[workflow(name = "review", queue = "docs", max_attempts = 5)]
/// impl Review {
///     #[step]
///     async fn fetch(url: String) -> Result<String, StepError> { Ok(url) }
///
///     #[step(depends_on = [fetch])]
///     async fn words(fetch: String) -> Result<usize, StepError> { Ok(fetch.split(' ').count()) }
///
///     #[step(depends_on = [fetch])]
///     async fn title(fetch: String) -> Result<String, StepError> { Ok(fetch) }
///
///     #[step(depends_on = [words, title], timeout = "5s")]
///     async fn report(words: usize, title: String, ctx: &StepContext) -> Result<String, StepError> {
///         Ok(format!("{title}: {words} words (run {})", ctx.run_id()))
///     }
/// }
/// ```
///
/// A conditional step and a map step:
///
/// ```ignore
/// pub struct Index;
///
/// #[workflow]
/// impl Index {
///     #[step]
///     async fn chunk(doc: String) -> Result<Vec<String>, StepError> { /* .. */ }
///
///     #[step(map)]                                // one task per chunk
///     async fn embed(chunk: String) -> Result<Vec<f32>, StepError> { /* .. */ }
///
///     #[step(when = Self::worth_storing)]         // skipped when false
///     async fn store(embed: Vec<Vec<f32>>, input: String) -> Result<u64, StepError> { /* .. */ }
///
///     #[step]
///     async fn report(store: Option<u64>) -> Result<String, StepError> { /* .. */ }
///
///     fn worth_storing(embed: &[Vec<f32>], input: &str) -> bool {
///         !embed.is_empty() && input.len() > 10
///     }
/// }
/// ```
///
/// # What it expands to
///
/// The impl block is emitted unchanged (minus the `#[step]` markers), so the step
/// functions stay callable and unit-testable. Next to it, roughly:
///
/// ```ignore
/// const _: () = {
///     // one type-erased entry per step
///     fn __pgflow_entry_1(inputs: &mut StepInputs, ctx: ContextSource<'_>) -> StepFuture {
///         // typed, or from JSON; moved out, or cloned when a retry may need it again
///         let fetch = match inputs.take::<String>(0, "fetch", &__PGFLOW_OPS_0) {
///             Ok(v) => v,
///             Err(e) => return failed(e),
///         };
///         // (a step taking `&StepContext` or a `&mut T` transaction:
///         // `let ctx = ctx.into_context();`; in process the context is made only then)
///         Box::pin(async move {
///             // (a conditional step: `if !pred(&fetch) { return Ok(StepOutput::Skipped) }`)
///             let out = <Review>::words(fetch).await.map_err(Into::into)?;
///             Ok(StepOutput::Completed(StepValue::typed(out, &__PGFLOW_OPS_1)))
///         })
///     }
///     // (a map step also gets a `MapOps`: its element parameter, split and collect)
///     // ...
///     static __PGFLOW_STEPS: [StepDef; 4] = [/* name, parents, params, options, entry */];
///     static __PGFLOW_DEF: WorkflowDef = /* name, version, queue, steps, terminal */;
///     impl pgflow::Workflow for Review {
///         type Input = String;
///         type Output = String;
///         const NAME: &'static str = "review";
///         const VERSION: u32 = 1;
///         fn definition() -> &'static WorkflowDef { &__PGFLOW_DEF }
///     }
///     inventory::submit! { Registration(<Review as Workflow>::definition) }
///     // type checks spanned at your tokens:
///     fn __pgflow_edge_1_0(v: String /* fetch's output */) -> String /* words' param */ { v }
/// };
/// ```
#[proc_macro_attribute]
pub fn workflow(args: TokenStream, item: TokenStream) -> TokenStream {
    workflow::workflow(args.into(), item.into()).into()
}

/// Marks an `async fn` of a `#[workflow]` impl block as a step; see [`macro@workflow`].
///
/// `#[workflow]` reads and removes these markers, so this attribute only runs when a
/// `#[step]` stands outside a workflow, which is an error.
#[proc_macro_attribute]
pub fn step(_args: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    let err = syn::Error::new(
        proc_macro2::Span::call_site(),
        "#[step] marks a step of a workflow: put it on an `async fn` inside an `impl` block annotated with `#[workflow]`",
    )
    .to_compile_error();
    quote::quote!(#err #item).into()
}
