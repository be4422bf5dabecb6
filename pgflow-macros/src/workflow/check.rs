//! Cross-step validation of the model: resolves every step's parents and binds each
//! data parameter to its source, then checks the graph (unknown and duplicate names,
//! cycles, unused parents, unbound parameters, exactly one terminal step, a step that
//! takes the workflow input). Every problem is recorded; the resolved [`Graph`] is
//! returned when the graph could be built.
//!
//! Binding rules (the `#[workflow]` docs state them for users):
//! - without `depends_on`, a step depends on the step declared just before it and
//!   its one non-`input` parameter takes that step's output; the first step's takes
//!   the workflow input;
//! - with `depends_on = [a, b]`, parameters bind by name to those parents
//!   (`depends_on = []` declares a root step);
//! - a parameter named `input` takes the workflow input in any step.

use std::collections::HashMap;

use proc_macro2::Span;
use syn::Ident;

use super::parse::{Step, Workflow};
use crate::ctxt::Ctxt;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Source {
    Input,
    Step(usize),
    /// The payload of the signal the step waits for.
    Signal,
}

pub(crate) struct Graph {
    /// Parents of each step, in declaration order of `depends_on` (or the implicit one).
    pub(crate) parents: Vec<Vec<usize>>,
    /// For each step, the source of each data parameter (in data-parameter order).
    pub(crate) sources: Vec<Vec<Source>>,
    /// The single step nothing depends on.
    pub(crate) terminal: usize,
    /// The step and data-parameter index whose type is the workflow input.
    pub(crate) input: (usize, usize),
    /// For each map step, the data parameter that takes one element.
    pub(crate) mapped: Vec<Option<usize>>,
    /// For each step that waits for a signal, the data parameter that takes it.
    pub(crate) signals: Vec<Option<usize>>,
}

const INPUT: &str = "input";

pub(crate) fn check(wf: &Workflow, cx: &mut Ctxt) -> Option<Graph> {
    let steps = &wf.steps;
    if steps.is_empty() {
        return None;
    }
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        let key = s.name.to_string();
        if key == INPUT || key == "r#input" {
            cx.error_spanned_by(
                &s.name,
                "a step cannot be named `input`: that name is reserved for parameters that take the workflow input",
            );
        }
        match index.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => cx.error_spanned_by(
                &s.name,
                format!(
                    "duplicate step name `{}`: each step of a workflow needs its own name",
                    e.key()
                ),
            ),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(i);
            }
        }
    }
    let all_names = steps
        .iter()
        .map(|s| format!("`{}`", s.name))
        .collect::<Vec<_>>()
        .join(", ");

    let mut parents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    // The span of each explicit `depends_on` entry, for cycle errors.
    let mut edge_spans: HashMap<(usize, usize), Span> = HashMap::new();
    let mut sources: Vec<Vec<Source>> = Vec::with_capacity(steps.len());
    let mut ok = true;

    for (i, step) in steps.iter().enumerate() {
        let mut step_sources = Vec::new();
        match &step.attr.depends_on {
            Some(list) => {
                let mut named: Vec<(usize, &Ident)> = Vec::new();
                // An unknown name is reported once, at its token: a parameter named
                // after it (or close to it: the intended step) is not reported again.
                let mut unknown: Vec<String> = Vec::new();
                for dep in list {
                    if *dep == step.name {
                        cx.error_spanned_by(
                            dep,
                            format!("cycle in the step graph: step `{dep}` depends on itself"),
                        );
                        ok = false;
                    } else if let Some(&p) = index.get(&dep.to_string()) {
                        if named.iter().any(|(q, _)| *q == p) {
                            cx.error_spanned_by(
                                dep,
                                format!("`{dep}` is listed twice in `depends_on`"),
                            );
                        } else {
                            named.push((p, dep));
                            edge_spans.insert((i, p), dep.span());
                        }
                    } else {
                        cx.error_spanned_by(
                            dep,
                            format!("unknown step `{dep}` in `depends_on`; the steps of this workflow are {all_names}"),
                        );
                        unknown.push(dep.to_string());
                        ok = false;
                    }
                }
                let parent_list = if named.is_empty() {
                    "it has none".to_owned()
                } else {
                    named
                        .iter()
                        .map(|(_, n)| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut used = vec![false; named.len()];
                for param in step.data_params() {
                    if takes_signal(step, param) {
                        step_sources.push(Source::Signal);
                    } else if param.name == INPUT {
                        step_sources.push(Source::Input);
                    } else if let Some(k) = named.iter().position(|(_, n)| **n == param.name) {
                        used[k] = true;
                        step_sources.push(Source::Step(named[k].0));
                    } else if unknown.iter().any(|u| similar(u, &param.name.to_string())) {
                        ok = false;
                    } else {
                        cx.error_spanned_by(
                            &param.name,
                            format!(
                                "parameter `{}` of step `{}` is bound to nothing: with `depends_on`, parameters bind by name to a parent ({parent_list}) or to `input`",
                                param.name, step.name
                            ),
                        );
                        ok = false;
                    }
                }
                for ((_, name), used) in named.iter().zip(&used) {
                    if !used && !step.param_errors {
                        cx.error_spanned_by(
                            name,
                            format!(
                                "step `{}` depends on `{name}` but takes no parameter named `{name}`: add `{name}: <its output type>` or remove it from `depends_on`",
                                step.name
                            ),
                        );
                        ok = false;
                    }
                }
                parents[i] = named.iter().map(|(p, _)| *p).collect();
            }
            None => {
                let implicit = i.checked_sub(1);
                let mut bound = false;
                for param in step.data_params() {
                    if takes_signal(step, param) {
                        step_sources.push(Source::Signal);
                    } else if param.name == INPUT {
                        step_sources.push(Source::Input);
                    } else if !bound {
                        bound = true;
                        step_sources.push(implicit.map_or(Source::Input, Source::Step));
                    } else {
                        let takes = implicit.map_or("the workflow input".to_owned(), |p| {
                            format!("the output of `{}`, the step before it,", steps[p].name)
                        });
                        cx.error_spanned_by(
                            &param.name,
                            format!(
                                "parameter `{}` of step `{}` is bound to nothing: without `depends_on`, a step takes only {takes} and `input`; list its parents with `depends_on = [..]` and name the parameters after them",
                                param.name, step.name
                            ),
                        );
                        ok = false;
                    }
                }
                match implicit {
                    Some(p) => {
                        if !bound && !step.param_errors {
                            cx.error_spanned_by(
                                &step.name,
                                format!(
                                    "step `{}` does not take the output of `{}`, the step declared before it, which it depends on by default: add a parameter for it, or declare its parents with `depends_on = [..]` (`depends_on = []` for none)",
                                    step.name, steps[p].name
                                ),
                            );
                            ok = false;
                        }
                        parents[i] = vec![p];
                    }
                    None => {
                        if step_sources.is_empty() && !step.param_errors {
                            cx.error_spanned_by(
                                &step.name,
                                format!(
                                    "step `{}` is the first step, so it takes the workflow input: add a parameter for it, e.g. `{}(input: MyInput)`",
                                    step.name, step.name
                                ),
                            );
                            ok = false;
                        }
                    }
                }
            }
        }
        sources.push(step_sources);
    }

    if ok && !report_cycles(steps, &parents, &edge_spans, cx) {
        ok = false;
    }

    for step in steps {
        if !check_predicate_arity(wf, step, cx) {
            ok = false;
        }
    }

    let signals = check_signals(steps, &sources, cx);
    if steps
        .iter()
        .zip(&signals)
        .any(|(s, g)| (s.attr.signal.is_some() || s.attr.signal_timeout.is_some()) && g.is_none())
    {
        ok = false;
    }

    let mapped = check_maps(steps, &parents, &sources, cx);
    if steps
        .iter()
        .zip(&mapped)
        .any(|(s, m)| s.attr.map.is_some() && m.is_none())
    {
        ok = false;
    }

    let input = sources.iter().enumerate().find_map(|(s, srcs)| {
        srcs.iter()
            .position(|src| *src == Source::Input)
            .map(|p| (s, p))
    });
    if input.is_none() && ok {
        cx.error_spanned_by(
            &wf.self_ty,
            "no step takes the workflow input: name a parameter `input` in a root step",
        );
    }

    let mut has_child = vec![false; steps.len()];
    for ps in &parents {
        for &p in ps {
            has_child[p] = true;
        }
    }
    let terminals: Vec<usize> = (0..steps.len()).filter(|&i| !has_child[i]).collect();
    if ok && terminals.len() > 1 {
        let names = terminals
            .iter()
            .map(|&t| format!("`{}`", steps[t].name))
            .collect::<Vec<_>>()
            .join(", ");
        let last = terminals[terminals.len() - 1];
        cx.error_spanned_by(
            &steps[last].name,
            format!(
                "a workflow ends in exactly one step, but nothing depends on {names}: add a final step that takes their outputs (`#[step(depends_on = [{}])]`) so the workflow has one output",
                terminals.iter().map(|&t| steps[t].name.to_string()).collect::<Vec<_>>().join(", ")
            ),
        );
        ok = false;
    }

    if !ok {
        return None;
    }
    Some(Graph {
        parents,
        sources,
        terminal: *terminals.first()?,
        input: input?,
        mapped,
        signals,
    })
}

/// Whether `param` takes the payload of the signal its step waits for (it is named
/// after the signal).
fn takes_signal(step: &Step, param: &super::parse::DataParam) -> bool {
    step.attr.signal.as_ref().is_some_and(|s| *s == param.name)
}

/// `T` of a type written `Option<T>` (also `std::option::Option<T>`).
pub(crate) fn option_inner(ty: &syn::Type) -> Option<&syn::Type> {
    let syn::Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        syn::GenericArgument::Type(t) if args.args.len() == 1 => Some(t),
        _ => None,
    }
}

/// The rules of signals: `signal_timeout` needs `signal`; the step takes a parameter
/// named after its signal, an `Option<T>` exactly when it has a timeout (`None` when
/// the timeout passed first); a map step waits for no signal; two steps of a workflow
/// do not wait for the same signal. Returns, for each valid signal step, the index of
/// its signal parameter.
fn check_signals(steps: &[Step], sources: &[Vec<Source>], cx: &mut Ctxt) -> Vec<Option<usize>> {
    let mut found = vec![None; steps.len()];
    let mut seen: HashMap<String, &Ident> = HashMap::new(); // signal -> its step
    for (i, step) in steps.iter().enumerate() {
        let name = &step.name;
        let Some(signal) = &step.attr.signal else {
            if let Some((key, _)) = &step.attr.signal_timeout {
                cx.error_spanned_by(
                    key,
                    format!(
                        "`signal_timeout` bounds the wait for a signal, but step `{name}` waits for none: add `signal = <name>` or remove `signal_timeout`"
                    ),
                );
            }
            continue;
        };
        let mut valid = true;
        if signal == INPUT {
            cx.error_spanned_by(
                signal,
                "a signal cannot be named `input`: parameters named `input` take the workflow input",
            );
            valid = false;
        }
        if let Some(first) = seen.get(&signal.to_string()) {
            cx.error_spanned_by(
                signal,
                format!(
                    "steps `{first}` and `{name}` both wait for signal `{signal}`, but a signal is delivered to one step of a run: give each its own signal"
                ),
            );
            valid = false;
        } else {
            seen.insert(signal.to_string(), name);
        }
        if let Some(map) = &step.attr.map {
            cx.error_spanned_by(
                map,
                format!(
                    "map step `{name}` cannot wait for a signal: a signal is delivered once per run, not per element; wait for it in a step before the map"
                ),
            );
            valid = false;
        }
        let k = sources[i].iter().position(|s| *s == Source::Signal);
        let Some(k) = k else {
            if !step.param_errors {
                let ty = if step.attr.signal_timeout.is_some() {
                    "Option<PayloadType>"
                } else {
                    "PayloadType"
                };
                cx.error_spanned_by(
                    signal,
                    format!(
                        "step `{name}` waits for signal `{signal}` but takes no parameter named `{signal}`: add `{signal}: {ty}` for its payload"
                    ),
                );
            }
            continue;
        };
        let Some(param) = step.data_params().nth(k) else {
            continue;
        };
        let optional = option_inner(&param.ty).is_some();
        match (&step.attr.signal_timeout, optional) {
            (Some(_), false) => {
                let ty = &param.ty;
                cx.error_spanned_by(
                    &param.ty,
                    format!(
                        "with `signal_timeout`, the signal parameter `{signal}` is an `Option` (`None` when the timeout passes first): write `{signal}: Option<{}>`",
                        super::parse::type_string(ty)
                    ),
                );
                valid = false;
            }
            (None, true) => {
                cx.error_spanned_by(
                    &param.ty,
                    format!(
                        "signal parameter `{signal}` is an `Option`, but step `{name}` waits without a timeout and always receives the payload: add `signal_timeout = \"..\"` (`None` when it passes) or take the payload type itself"
                    ),
                );
                valid = false;
            }
            _ => {}
        }
        if valid {
            found[i] = Some(k);
        }
    }
    found
}

/// Whether two names are the same or one typo apart (at most two single-character
/// edits): a parameter named so was meant for the misspelled parent.
fn similar(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}

/// A `when = Self::pred` whose `pred` is an associated fn of this impl block must
/// take one argument per data parameter of the step (a reference to each, in order):
/// otherwise the mistake is reported here, at the path, with the signature it needs,
/// rather than by rustc as a call with the wrong number of arguments (whose "remove
/// the extra argument" fix would break the step). A predicate defined elsewhere is
/// left to rustc.
fn check_predicate_arity(wf: &Workflow, step: &Step, cx: &mut Ctxt) -> bool {
    let Some((_, path)) = &step.attr.when else {
        return true;
    };
    let segments: Vec<&syn::PathSegment> = path.segments.iter().collect();
    let [first, name] = segments.as_slice() else {
        return true;
    };
    if first.ident != "Self" {
        return true;
    }
    let Some(pred) = wf.item.items.iter().find_map(|item| match item {
        syn::ImplItem::Fn(f) if f.sig.ident == name.ident => Some(f),
        _ => None,
    }) else {
        return true;
    };
    let takes = pred
        .sig
        .inputs
        .iter()
        .filter(|a| matches!(a, syn::FnArg::Typed(_)))
        .count();
    let params: Vec<&super::parse::DataParam> = step.data_params().collect();
    if takes == params.len() {
        return true;
    }
    let signature = params
        .iter()
        .map(|p| {
            let ty = &p.ty;
            format!(
                "{}: &{}",
                p.name,
                quote::quote!(#ty).to_string().replace(' ', "")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let inputs = params
        .iter()
        .map(|p| format!("`{}`", p.name))
        .collect::<Vec<_>>()
        .join(", ");
    cx.error_spanned_by(
        path,
        format!(
            "the predicate of step `{}` gets a reference to each of its {} input(s), in order ({inputs}), but `{}` takes {takes}: write it as `fn {}({signature}) -> bool`",
            step.name,
            params.len(),
            name.ident,
            name.ident,
        ),
    );
    false
}

/// The rules of map steps: a map step maps over the `Vec` of its single
/// parent, or over the workflow input when it is a root; that parent always runs;
/// `map` and `when` do not combine. Returns, for each valid map step, the index of
/// its element parameter. (That the source is a `Vec` is left to rustc.)
fn check_maps(
    steps: &[Step],
    parents: &[Vec<usize>],
    sources: &[Vec<Source>],
    cx: &mut Ctxt,
) -> Vec<Option<usize>> {
    let mut mapped = vec![None; steps.len()];
    for (i, step) in steps.iter().enumerate() {
        let Some(map) = &step.attr.map else { continue };
        if step.attr.signal.is_some() {
            // refused by `check_signals`
            continue;
        }
        let name = &step.name;
        if step.attr.when.is_some() {
            cx.error_spanned_by(
                map,
                format!(
                    "step `{name}` cannot be both `map` and `when`: a map step runs once per element of a `Vec`; to leave elements out, filter the vector in the step that returns it"
                ),
            );
            continue;
        }
        match parents[i].as_slice() {
            [] => {
                let n = sources[i].len();
                if n == 1 {
                    mapped[i] = Some(0);
                } else {
                    cx.error_spanned_by(
                        map,
                        format!(
                            "root map step `{name}` maps over the workflow input, so it takes exactly one data parameter, one element of it (`item: T` for a `Vec<T>` input), but it takes {n}"
                        ),
                    );
                }
            }
            [p] => {
                let parent = &steps[*p];
                if parent.attr.when.is_some() {
                    cx.error_spanned_by(
                        map,
                        format!(
                            "map step `{name}` maps over the output of `{}`, a conditional step that may be skipped: map over a step that always runs, e.g. add a step that turns its `Option<Vec<T>>` into a `Vec<T>`",
                            parent.name
                        ),
                    );
                    continue;
                }
                mapped[i] = sources[i].iter().position(|s| *s == Source::Step(*p));
            }
            many => {
                let names = many
                    .iter()
                    .map(|&p| format!("`{}`", steps[p].name))
                    .collect::<Vec<_>>()
                    .join(", ");
                cx.error_spanned_by(
                    map,
                    format!(
                        "map step `{name}` maps over the `Vec` of a single parent, but it depends on {names}: join them in a step before the map, or take the other values through `input`"
                    ),
                );
            }
        }
    }
    mapped
}

/// Reports each cycle once, at the `depends_on` entry that closes it. Returns
/// whether the graph is acyclic.
fn report_cycles(
    steps: &[Step],
    parents: &[Vec<usize>],
    edge_spans: &HashMap<(usize, usize), Span>,
    cx: &mut Ctxt,
) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        n: usize,
        parents: &[Vec<usize>],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
        found: &mut Vec<Vec<usize>>,
    ) {
        marks[n] = Mark::Active;
        stack.push(n);
        for &p in &parents[n] {
            match marks[p] {
                Mark::New => visit(p, parents, marks, stack, found),
                Mark::Active => {
                    let from = stack.iter().position(|&s| s == p).unwrap_or(0);
                    found.push(stack[from..].to_vec());
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks[n] = Mark::Done;
    }
    let mut marks = vec![Mark::New; steps.len()];
    let mut found = Vec::new();
    for n in 0..steps.len() {
        if marks[n] == Mark::New {
            visit(n, parents, &mut marks, &mut Vec::new(), &mut found);
        }
    }
    for cycle in &found {
        // In `cycle` each step depends on the next and the last depends on the first;
        // the message starts at the last, whose `depends_on` entry closes the cycle.
        let closing_child = cycle[cycle.len() - 1];
        let closing_parent = cycle[0];
        let path: Vec<String> = std::iter::once(&closing_child)
            .chain(cycle.iter())
            .map(|&s| steps[s].name.to_string())
            .collect();
        let span = edge_spans
            .get(&(closing_child, closing_parent))
            .copied()
            .unwrap_or_else(|| steps[closing_child].name.span());
        cx.error_at(
            span,
            format!(
                "cycle in the step graph: {} (each step waits for the next); remove one of these dependencies",
                path.join(" -> ")
            ),
        );
    }
    found.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::WorkflowAttr;
    use quote::quote;

    fn check_tokens(tokens: proc_macro2::TokenStream) -> (Option<Graph>, String) {
        let mut cx = Ctxt::default();
        let item = syn::parse2(tokens).expect("an impl block");
        let wf = super::super::parse::parse(item, WorkflowAttr::default(), &mut cx);
        let graph = check(&wf, &mut cx);
        (graph, cx.into_compile_errors().to_string())
    }

    #[test]
    fn chain_binds_implicitly() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step] async fn a(req: Req) -> Result<A, E> { body() }
                #[step] async fn b(x: A, input: Req) -> Result<B, E> { body() }
                #[step] async fn c(y: B) -> Result<C, E> { body() }
            }
        });
        let g = g.unwrap_or_else(|| panic!("{errors}"));
        assert_eq!(g.parents, vec![vec![], vec![0], vec![1]]);
        assert_eq!(g.sources[1], vec![Source::Step(0), Source::Input]);
        assert_eq!(g.terminal, 2);
        assert_eq!(g.input, (0, 0));
    }

    #[test]
    fn diamond_binds_by_name() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step] async fn a(req: Req) -> Result<A, E> { body() }
                #[step(depends_on = [a])] async fn b(a: A) -> Result<B, E> { body() }
                #[step(depends_on = [a])] async fn c(a: A) -> Result<C, E> { body() }
                #[step(depends_on = [c, b])] async fn d(b: B, c: C, input: Req) -> Result<D, E> { body() }
            }
        });
        let g = g.unwrap_or_else(|| panic!("{errors}"));
        assert_eq!(g.parents[3], vec![2, 1]);
        assert_eq!(
            g.sources[3],
            vec![Source::Step(1), Source::Step(2), Source::Input]
        );
        assert_eq!(g.terminal, 3);
    }

    #[test]
    fn cycle_is_reported_with_its_path() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step] async fn a(req: Req) -> Result<A, E> { body() }
                #[step(depends_on = [c])] async fn b(c: C) -> Result<B, E> { body() }
                #[step(depends_on = [b])] async fn c(b: B) -> Result<C, E> { body() }
                #[step(depends_on = [a, c])] async fn d(a: A, c: C) -> Result<D, E> { body() }
            }
        });
        assert!(g.is_none());
        assert!(
            errors.contains("cycle in the step graph: b -> c -> b")
                || errors.contains("cycle in the step graph: c -> b -> c"),
            "{errors}"
        );
    }

    #[test]
    fn graph_errors_accumulate() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step] async fn a(req: Req) -> Result<A, E> { body() }
                #[step(depends_on = [nope, a])] async fn b(x: A) -> Result<B, E> { body() }
                #[step(depends_on = [a])] async fn c(a: A) -> Result<C, E> { body() }
            }
        });
        assert!(g.is_none());
        for needle in [
            "unknown step `nope`",
            "parameter `x` of step `b` is bound to nothing",
            "depends on `a` but takes no parameter named `a`",
        ] {
            assert!(errors.contains(needle), "missing {needle:?} in {errors}");
        }
    }

    #[test]
    fn map_steps_find_their_element_parameter() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step(map)] async fn a(item: u8) -> Result<A, E> { body() }
                #[step] async fn b(all: Vec<A>) -> Result<Vec<B>, E> { body() }
                #[step(map)] async fn c(input: Vec<u8>, one: B) -> Result<C, E> { body() }
            }
        });
        let g = g.unwrap_or_else(|| panic!("{errors}"));
        assert_eq!(g.mapped, vec![Some(0), None, Some(1)]);
    }

    #[test]
    fn map_errors_accumulate() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step(depends_on = [], map)] async fn a(input: u8, ctx: &StepContext) -> Result<A, E> { body() }
                #[step(depends_on = [], when = Self::p)] async fn b(input: u8) -> Result<Vec<B>, E> { body() }
                #[step(depends_on = [b], map)] async fn c(b: B) -> Result<C, E> { body() }
                #[step(depends_on = [a, c], map, when = Self::q)] async fn d(a: A, c: C) -> Result<D, E> { body() }
                #[step(depends_on = [a, c], map)] async fn e(a: A, c: C) -> Result<D, E> { body() }
                #[step(depends_on = [], map)] async fn f(ctx: &StepContext) -> Result<D, E> { body() }
            }
        });
        assert!(g.is_none());
        for needle in [
            "step `d` cannot be both `map` and `when`",
            "`c` maps over the output of `b`, a conditional step",
            "depends on `a`, `c`",
            "root map step `f`",
        ] {
            assert!(errors.contains(needle), "missing {needle:?} in {errors}");
        }
    }

    #[test]
    fn signal_parameters_bind_to_the_signal() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step] async fn a(req: Req) -> Result<A, E> { body() }
                #[step(signal = ok, signal_timeout = "1h")] async fn b(ok: Option<Ok>, x: A) -> Result<B, E> { body() }
                #[step(depends_on = [b], signal = go)] async fn c(b: B, go: Go) -> Result<C, E> { body() }
            }
        });
        let g = g.unwrap_or_else(|| panic!("{errors}"));
        assert_eq!(g.sources[1], vec![Source::Signal, Source::Step(0)]);
        assert_eq!(g.sources[2], vec![Source::Step(1), Source::Signal]);
        assert_eq!(g.signals, vec![None, Some(0), Some(1)]);
    }

    #[test]
    fn signal_errors_accumulate() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step(signal = ok)] async fn a(req: Req) -> Result<A, E> { body() }
                #[step(signal_timeout = "1h")] async fn b(a: A) -> Result<B, E> { body() }
                #[step(signal = go, signal_timeout = "1h")] async fn c(b: B, go: Go) -> Result<C, E> { body() }
                #[step(signal = go)] async fn d(c: C, go: Option<Go>) -> Result<D, E> { body() }
            }
        });
        assert!(g.is_none());
        for needle in [
            "takes no parameter named `ok`",
            "`signal_timeout` bounds the wait for a signal, but step `b` waits for none",
            "write `go: Option<Go>`",
            "steps `c` and `d` both wait for signal `go`",
            "signal parameter `go` is an `Option`",
        ] {
            assert!(errors.contains(needle), "missing {needle:?} in {errors}");
        }
    }

    #[test]
    fn two_terminals_are_named() {
        let (g, errors) = check_tokens(quote! {
            impl W {
                #[step] async fn a(req: Req) -> Result<A, E> { body() }
                #[step(depends_on = [a])] async fn b(a: A) -> Result<B, E> { body() }
                #[step(depends_on = [a])] async fn c(a: A) -> Result<C, E> { body() }
            }
        });
        assert!(g.is_none());
        assert!(errors.contains("nothing depends on `b`, `c`"), "{errors}");
    }
}
