//! Expansion of a checked model: the `ValueOps` of each value type, one type-erased
//! entry per step, the static step table and definition, the `Workflow` impl, the
//! `inventory` registration, and the compile-time checks that make rustc report type
//! mistakes at the user's tokens (a parent's output type flowing into a child's
//! parameter, and the `StepData` bound on every input and output type).
//!
//! Everything generated sits in one `const _: () = { .. };` block and names runtime
//! items only through [`crate::paths`].

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, Type};

use super::check::{Graph, Source};
use super::parse::{Arg, Step, Workflow, snake_case, tokens_string, type_string};
use crate::attr::RetryOptions;
use crate::paths;

/// Options as written: a step's own, else its workflow's; what neither sets is
/// `StepOptions::DEFAULT`'s, named in the expansion (the defaults are written once,
/// in `pgflow`).
struct Options {
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
    backoff_ms: Option<u64>,
    priority: Option<i16>,
    max_snoozes: Option<u32>,
    /// A step's own only (no workflow default).
    delay_ms: Option<u64>,
    estimate_cents: Option<u64>,
    estimate_tokens: Option<u64>,
}

impl Options {
    fn merge(own: &RetryOptions, fallback: &Options) -> Options {
        Options {
            max_attempts: own.max_attempts.or(fallback.max_attempts),
            timeout_ms: own.timeout.or(fallback.timeout_ms),
            backoff_ms: own.backoff.or(fallback.backoff_ms),
            priority: own.priority.or(fallback.priority),
            max_snoozes: own.max_snoozes.or(fallback.max_snoozes),
            delay_ms: None,
            estimate_cents: None,
            estimate_tokens: None,
        }
    }

    fn tokens(&self) -> TokenStream {
        let step_options = paths::step_options();
        let duration = paths::duration();
        let max_attempts = self.max_attempts.map_or_else(
            || quote!(#step_options::DEFAULT.max_attempts),
            |n| quote!(#n),
        );
        let timeout = self.timeout_ms.map_or_else(
            || quote!(#step_options::DEFAULT.timeout),
            |ms| quote!(#duration::from_millis(#ms)),
        );
        let backoff = self.backoff_ms.map_or_else(
            || quote!(#step_options::DEFAULT.backoff),
            |ms| quote!(#duration::from_millis(#ms)),
        );
        let priority = self
            .priority
            .map_or_else(|| quote!(#step_options::DEFAULT.priority), |p| quote!(#p));
        let delay = self.delay_ms.map_or_else(
            || quote!(#step_options::DEFAULT.delay),
            |ms| quote!(#duration::from_millis(#ms)),
        );
        let max_snoozes = self.max_snoozes.map_or_else(
            || quote!(#step_options::DEFAULT.max_snoozes),
            |n| quote!(#n),
        );
        let estimate_cents = self.estimate_cents.unwrap_or(0);
        let estimate_tokens = self.estimate_tokens.unwrap_or(0);
        quote! {
            #step_options {
                max_attempts: #max_attempts,
                timeout: #timeout,
                backoff: #backoff,
                priority: #priority,
                delay: #delay,
                max_snoozes: #max_snoozes,
                estimate_cents: #estimate_cents,
                estimate_tokens: #estimate_tokens,
            }
        }
    }
}

/// A type the expansion names, with its readable name (`Vec<u32>`).
#[derive(Clone)]
struct Named {
    ty: Type,
    name: String,
}

impl Named {
    fn of(ty: &Type) -> Self {
        Named {
            ty: ty.clone(),
            name: type_string(ty),
        }
    }

    /// `outer<inner>` (`Vec` or `Option`), spanned at the inner type so that a bound
    /// on it is reported at the user's type.
    fn wrap(outer: &str, inner: &Named) -> Self {
        let path = match outer {
            "Vec" => paths::vec(),
            _ => paths::option(),
        };
        let ty = &inner.ty;
        let tokens = respan(quote!(#path<#ty>), ty.span());
        Named {
            ty: syn::parse2(tokens).unwrap_or_else(|_| ty.clone()),
            name: format!("{outer}<{}>", inner.name),
        }
    }
}

/// The types of a checked model that the expansion names.
struct Types<'a> {
    /// The workflow input.
    input: Named,
    /// Each step's own success type (`T` of its `Result<T, E>`; per element for a map).
    own: Vec<&'a Type>,
    /// What each step's children see: `Vec<U>` for a map step, else its own type.
    seen: Vec<Named>,
    /// The workflow output: the terminal's seen type, or `Option` of it when the
    /// terminal step is conditional.
    output: Named,
}

impl<'a> Types<'a> {
    fn new(wf: &'a Workflow, g: &Graph) -> Self {
        let steps = &wf.steps;
        let own: Vec<&Type> = steps.iter().map(own_output).collect();
        let seen = steps
            .iter()
            .map(|s| {
                if s.attr.map.is_some() {
                    Named::wrap("Vec", &own_named(s))
                } else {
                    own_named(s)
                }
            })
            .collect::<Vec<_>>();
        let (si, pi) = g.input;
        let param_ty = &data_param(&steps[si], pi).ty;
        // A root map step's parameter is one element of the input.
        let input = if g.mapped[si] == Some(pi) {
            Named::wrap("Vec", &Named::of(param_ty))
        } else {
            Named::of(param_ty)
        };
        let terminal = &seen[g.terminal];
        let output = if steps[g.terminal].attr.when.is_some() {
            Named::wrap("Option", terminal)
        } else {
            terminal.clone()
        };
        Types {
            input,
            own,
            seen,
            output,
        }
    }
}

/// `T` of a type written `Vec<T>` (or `std::vec::Vec<T>`), if it is written so.
fn vec_element(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if p.qself.is_some() || seg.ident != "Vec" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [syn::GenericArgument::Type(t)] => Some(t),
        _ => None,
    }
}

/// The durable name: the `name` option, else the type name in snake_case.
fn workflow_name(wf: &Workflow) -> String {
    wf.attr.name.as_ref().map_or_else(
        || {
            snake_case(
                &wf.type_ident
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        },
        syn::LitStr::value,
    )
}

/// What stands in for the expansion when the macro reported errors: an `impl
/// Workflow` with the types it could tell (the input: a parameter named `input`, else
/// the first step's first parameter; the output: the last step's), or `()`, so that
/// code naming the workflow (`rt.start::<W>(..)`) reports nothing more than the real
/// mistakes. It registers nothing and is never run: the crate does not compile.
pub(crate) fn placeholder(wf: &Workflow) -> TokenStream {
    let self_ty = &wf.self_ty;
    let workflow_trait = paths::workflow_trait();
    let workflow_def = paths::workflow_def();
    let unit: Type = syn::parse_quote!(());
    let input = wf
        .steps
        .iter()
        .flat_map(|s| s.data_params())
        .find(|p| p.name == "input")
        .or_else(|| wf.steps.first().and_then(|s| s.data_params().next()))
        .map_or(&unit, |p| &p.ty);
    let output = wf
        .steps
        .last()
        .and_then(|s| {
            s.subflow
                .as_ref()
                .map(|(_, seen)| seen)
                .or(s.output.as_ref())
        })
        .unwrap_or(&unit);
    let name = workflow_name(wf);
    let version = wf.attr.version.unwrap_or(1);
    let senders = signal_senders(wf);
    quote! {
        #senders
        const _: () = {
            impl #workflow_trait for #self_ty {
                type Input = #input;
                type Output = #output;
                const NAME: &'static str = #name;
                const VERSION: u32 = #version;
                fn definition() -> &'static #workflow_def {
                    ::core::unreachable!("`#[workflow]` reported errors for this workflow")
                }
            }
        };
    }
}

pub(crate) fn expand(wf: &Workflow, g: &Graph) -> TokenStream {
    let private = paths::private();
    let self_ty = &wf.self_ty;
    let steps = &wf.steps;

    let name = workflow_name(wf);
    let version = wf.attr.version.unwrap_or(1);
    let queue = wf
        .attr
        .queue
        .as_ref()
        .map_or_else(|| "default".to_owned(), syn::LitStr::value);
    let defaults = Options::merge(
        &wf.attr.retry,
        &Options {
            max_attempts: None,
            timeout_ms: None,
            backoff_ms: None,
            priority: None,
            max_snoozes: None,
            delay_ms: None,
            estimate_cents: None,
            estimate_tokens: None,
        },
    );

    let types = Types::new(wf, g);
    let input_ty = &types.input.ty;
    let output_ty = &types.output.ty;
    let terminal_conditional = steps[g.terminal].attr.when.is_some();

    // ValueOps of the input, of what each step's children see, and for map steps of
    // the element and of one element's output.
    let input_ops = format_ident!("__PGFLOW_OPS_INPUT");
    let step_ops: Vec<Ident> = (0..steps.len())
        .map(|i| format_ident!("__PGFLOW_OPS_{}", i))
        .collect();
    let mut value_ops = value_ops_tokens(&input_ops, &types.input);
    for (ops, ty) in step_ops.iter().zip(&types.seen) {
        value_ops.extend(value_ops_tokens(ops, ty));
    }
    let output_ops = if terminal_conditional {
        let ops = format_ident!("__PGFLOW_OPS_OUTPUT");
        value_ops.extend(value_ops_tokens(&ops, &types.output));
        ops
    } else {
        step_ops[g.terminal].clone()
    };

    let mut map_tables = TokenStream::new();
    let mut map_refs: Vec<TokenStream> = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let Some(k) = g.mapped[i] else {
            map_refs.push(quote!(::core::option::Option::None));
            continue;
        };
        let item_ty = &data_param(s, k).ty;
        let elem_ty = types.own[i];
        let item_ops = format_ident!("__PGFLOW_OPS_ITEM_{}", i);
        let elem_ops = format_ident!("__PGFLOW_OPS_ELEM_{}", i);
        value_ops.extend(value_ops_tokens(&item_ops, &Named::of(item_ty)));
        value_ops.extend(value_ops_tokens(&elem_ops, &own_named(s)));
        let split = format_ident!("__pgflow_split_{}", i);
        let collect = format_ident!("__pgflow_collect_{}", i);
        let table = format_ident!("__PGFLOW_MAP_{}", i);
        let seen_ops = &step_ops[i];
        let step_value = paths::step_value();
        let step_error = paths::step_error();
        let result = paths::result();
        let vec = paths::vec();
        let map_ops = paths::map_ops();
        let split_call = quote_spanned!(item_ty.span()=> #private::split_vec::<#item_ty>);
        let collect_call = quote_spanned!(elem_ty.span()=> #private::collect_vec::<#elem_ty>);
        map_tables.extend(quote! {
            fn #split(value: #step_value) -> #result<#vec<#step_value>, #step_error> {
                #split_call(value, &#item_ops)
            }
            fn #collect(values: #vec<#step_value>) -> #result<#step_value, #step_error> {
                #collect_call(values, &#seen_ops)
            }
            static #table: #map_ops = #private::map_ops(#private::MapParts {
                param: #k,
                item: &#item_ops,
                element_output: &#elem_ops,
                split: #split,
                collect: #collect,
            });
        });
        map_refs.push(quote!(::core::option::Option::Some(&#table)));
    }

    // The ValueOps of each signal parameter (`T`, or `Option<T>` with a timeout) and
    // the step's `SignalDef`.
    let mut signal_ops: Vec<Ident> = Vec::with_capacity(steps.len());
    let mut signal_refs: Vec<TokenStream> = Vec::with_capacity(steps.len());
    let mut signal_tables = TokenStream::new();
    for (i, s) in steps.iter().enumerate() {
        let ops = format_ident!("__PGFLOW_OPS_SIGNAL_{}", i);
        let (Some(k), Some(signal)) = (g.signals[i], &s.attr.signal) else {
            signal_ops.push(ops);
            signal_refs.push(quote!(::core::option::Option::None));
            continue;
        };
        let param_ty = &data_param(s, k).ty;
        value_ops.extend(value_ops_tokens(&ops, &Named::of(param_ty)));
        let payload = type_string(payload_type(s, param_ty));
        let name = signal.to_string();
        let timeout = match &s.attr.signal_timeout {
            Some((_, ms)) => {
                let duration = paths::duration();
                quote!(::core::option::Option::Some(#duration::from_millis(#ms)))
            }
            None => quote!(::core::option::Option::None),
        };
        let table = format_ident!("__PGFLOW_SIGNAL_{}", i);
        let signal_def = paths::signal_def();
        signal_tables.extend(quote! {
            static #table: #signal_def = #signal_def {
                name: #name,
                param: #k,
                payload_type: #payload,
                timeout: #timeout,
            };
        });
        signal_ops.push(ops);
        signal_refs.push(quote!(::core::option::Option::Some(&#table)));
    }

    let entries: Vec<TokenStream> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let params: Vec<ParamFeed<'_>> = g.sources[i]
                .iter()
                .enumerate()
                .map(|(k, src)| {
                    if g.mapped[i] == Some(k) {
                        return ParamFeed::Element(format_ident!("__PGFLOW_OPS_ITEM_{}", i));
                    }
                    match src {
                        Source::Signal => ParamFeed::Value(&signal_ops[i]),
                        Source::Input => ParamFeed::Value(&input_ops),
                        Source::Step(p) if steps[*p].attr.when.is_some() => {
                            ParamFeed::Optional(&step_ops[*p], types.own[*p])
                        }
                        Source::Step(p) => ParamFeed::Value(&step_ops[*p]),
                    }
                })
                .collect();
            let out_ops = if g.mapped[i].is_some() {
                format_ident!("__PGFLOW_OPS_ELEM_{}", i)
            } else {
                step_ops[i].clone()
            };
            entry_tokens(self_ty, s, i, &out_ops, &params)
        })
        .collect();

    let step_def = paths::step_def();
    let param = paths::param();
    let param_source = paths::param_source();
    let step_rows = steps.iter().enumerate().map(|(i, s)| {
        let step_name = s.name.to_string();
        let parents = &g.parents[i];
        let params = s.data_params().zip(&g.sources[i]).map(|(p, src)| {
            let pname = p.name.to_string();
            let tname = type_string(&p.ty);
            let source = match src {
                Source::Input => quote!(#param_source::Input),
                Source::Step(k) => quote!(#param_source::Step(#k)),
                Source::Signal => quote!(#param_source::Signal),
            };
            quote!(#param { name: #pname, source: #source, type_name: #tname })
        });
        let takes_context = s.takes_context();
        let takes_transaction = s.transaction().is_some();
        let limits: Vec<String> = s
            .attr
            .limits
            .iter()
            .flatten()
            .map(syn::LitStr::value)
            .collect();
        let when = match &s.attr.when {
            Some((_, path)) => {
                let text = tokens_string(quote!(#path));
                quote!(::core::option::Option::Some(#text))
            }
            None => quote!(::core::option::Option::None),
        };
        let map = &map_refs[i];
        let signal = &signal_refs[i];
        let options = Options {
            delay_ms: s.attr.delay,
            estimate_cents: s.attr.estimate_cents,
            estimate_tokens: s.attr.estimate_tokens,
            ..Options::merge(&s.attr.retry, &defaults)
        }
        .tokens();
        let ops = &step_ops[i];
        let entry = format_ident!("__pgflow_entry_{}", i);
        let subflow = match &s.subflow {
            Some((w, _)) => {
                let workflow_trait = paths::workflow_trait();
                quote!(::core::option::Option::Some(<#w as #workflow_trait>::definition))
            }
            None => quote!(::core::option::Option::None),
        };
        quote! {
            #private::step_def(#private::StepParts {
                name: #step_name,
                index: #i,
                parents: &[#(#parents),*],
                params: &[#(#params),*],
                takes_context: #takes_context,
                takes_transaction: #takes_transaction,
                limits: &[#(#limits),*],
                when: #when,
                map: #map,
                signal: #signal,
                subflow: #subflow,
                options: #options,
                output: &#ops,
                run: #entry,
            })
        }
    });
    let step_count = steps.len();
    let terminal = g.terminal;
    let defaults_tokens = defaults.tokens();
    // `module::Type` for `impl Type`; the path as written for `impl a::b::Type`.
    let rust_type = match &wf.self_ty {
        Type::Path(p) if p.path.segments.len() == 1 => {
            let ident = p.path.segments[0].ident.to_string();
            quote!(::core::concat!(::core::module_path!(), "::", #ident))
        }
        other => {
            let written = type_string(other);
            quote!(#written)
        }
    };
    let workflow_trait = paths::workflow_trait();
    let workflow_def = paths::workflow_def();

    // A conditional terminal step: the workflow's output is `Option<T>`.
    let (finish_fn, finish) = if terminal_conditional {
        let own = types.own[g.terminal];
        let step_output = paths::step_output();
        let step_value = paths::step_value();
        let step_error = paths::step_error();
        let result = paths::result();
        let call = quote_spanned!(own.span()=> #private::finish_optional::<#own>);
        (
            quote! {
                fn __pgflow_finish(output: #step_output) -> #result<#step_value, #step_error> {
                    #call(output, &#output_ops)
                }
            },
            quote!(::core::option::Option::Some(__pgflow_finish)),
        )
    } else {
        (TokenStream::new(), quote!(::core::option::Option::None))
    };

    let checks = type_checks(wf, g, &types);
    let senders = signal_senders(wf);
    let (key_fn, key_ref) = match &wf.attr.key {
        Some(path) => {
            let span = path
                .segments
                .last()
                .map_or_else(|| path.span(), |s| s.ident.span());
            let callee = self_path(self_ty, path);
            let call = quote_spanned!(span=> ::std::string::ToString::to_string(&#callee(input)));
            (
                quote! {
                    fn key(input: &Self::Input) -> ::core::option::Option<::std::string::String> {
                        ::core::option::Option::Some(#call)
                    }
                },
                quote!(::core::option::Option::Some(#private::key_from_json::<#self_ty>)),
            )
        }
        None => (TokenStream::new(), quote!(::core::option::Option::None)),
    };

    quote! {
        #senders

        const _: () = {
            #value_ops
            #map_tables
            #signal_tables
            #(#entries)*
            #finish_fn

            static __PGFLOW_STEPS: [#step_def; #step_count] = [#(#step_rows),*];

            static __PGFLOW_DEF: #workflow_def = #private::workflow_def(#private::WorkflowParts {
                name: #name,
                version: #version,
                queue: #queue,
                rust_type: #rust_type,
                file: ::core::file!(),
                line: ::core::line!(),
                defaults: #defaults_tokens,
                input: &#input_ops,
                output: &#output_ops,
                finish: #finish,
                steps: &__PGFLOW_STEPS,
                terminal: #terminal,
                key: #key_ref,
            });

            #[automatically_derived]
            impl #workflow_trait for #self_ty {
                type Input = #input_ty;
                type Output = #output_ty;
                const NAME: &'static str = #name;
                const VERSION: u32 = #version;
                fn definition() -> &'static #workflow_def {
                    &__PGFLOW_DEF
                }
                #key_fn
            }

            #private::inventory::submit! {
                #private::Registration(<#self_ty as #workflow_trait>::definition)
            }

            #checks
        };
    }
}

/// The payload type of a step's signal parameter: `T` of an `Option<T>` with a
/// timeout, else the parameter's type.
fn payload_type<'t>(step: &Step, param_ty: &'t Type) -> &'t Type {
    if step.attr.signal_timeout.is_some() {
        super::check::option_inner(param_ty).unwrap_or(param_ty)
    } else {
        param_ty
    }
}

/// The typed senders: for each signal, an associated constant of the workflow type
/// named after it, `Review::approval: Signal<Review, Approval>`, so a sender's
/// payload type is checked by rustc. Also emitted for a workflow with errors, so
/// code that sends its signals reports nothing more than the real mistakes.
pub(crate) fn signal_senders(wf: &Workflow) -> TokenStream {
    let self_ty = &wf.self_ty;
    let signal = paths::signal();
    let private = paths::private();
    let mut seen = Vec::new();
    let consts: Vec<TokenStream> = wf
        .steps
        .iter()
        .filter_map(|s| {
            let name = s.attr.signal.as_ref()?;
            let param = s.data_params().find(|p| p.name == *name)?;
            if seen.contains(name) {
                return None;
            }
            seen.push(name.clone());
            let payload = payload_type(s, &param.ty);
            let text = name.to_string();
            let doc = format!(
                "The signal `{text}` that step `{}` waits for: pass it to a sender with its payload.",
                s.name
            );
            Some(quote! {
                #[doc = #doc]
                #[allow(non_upper_case_globals, dead_code)]
                pub const #name: #signal<#self_ty, #payload> = #private::signal(#text);
            })
        })
        .collect();
    if consts.is_empty() {
        return TokenStream::new();
    }
    quote! {
        #[automatically_derived]
        impl #self_ty {
            #(#consts)*
        }
    }
}

fn data_param(step: &Step, k: usize) -> &super::parse::DataParam {
    step.data_params()
        .nth(k)
        .unwrap_or_else(|| unreachable!("check() bound parameter {k} of `{}`", step.name))
}

fn output(step: &Step) -> &Type {
    step.output
        .as_ref()
        .unwrap_or_else(|| unreachable!("check() accepted `{}` without an output type", step.name))
}

/// The type of one output of a step as its children see it: `T` of `Result<T, E>`,
/// or `<W as Workflow>::Output` for a step returning `Subflow<W>` (per element, for
/// a map step).
fn own_output(step: &Step) -> &Type {
    step.subflow
        .as_ref()
        .map_or_else(|| output(step), |(_, seen)| seen)
}

/// [`own_output`] with its readable name (`Research::Output` for a subflow).
fn own_named(step: &Step) -> Named {
    match &step.subflow {
        Some((w, seen)) => Named {
            ty: seen.clone(),
            name: format!("{}::Output", type_string(w)),
        },
        None => Named::of(output(step)),
    }
}

/// A `static` `ValueOps` for `ty`, with its `duplicate` picked by autoref
/// specialization (`Clone` when the type has it, a JSON round trip otherwise).
fn value_ops_tokens(ops: &Ident, named: &Named) -> TokenStream {
    let ty = &named.ty;
    let private = paths::private();
    let value_ops = paths::value_ops();
    let any = paths::any();
    let lower = ops.to_string().to_lowercase();
    let suffix = lower.trim_start_matches("__pgflow_ops");
    let dup = format_ident!("__pgflow_dup{suffix}");
    let clone = format_ident!("__pgflow_clone{suffix}");
    let type_name = &named.name;
    // The one place that requires `T: StepData`, spanned at the user's type so a
    // type that is not (de)serializable is reported there.
    let of = quote_spanned!(ty.span()=> ::pgflow::__private::ValueOps::of::<#ty>);
    quote! {
        fn #dup(value: &(dyn #any + ::core::marker::Send)) -> #private::DupResult {
            #[allow(unused_imports)]
            use #private::{DupNoClone as _, DupViaClone as _};
            ((&&#private::Dup::<#ty>::new()).dup_fn())(value)
        }
        fn #clone(
            value: &(dyn #any + ::core::marker::Send),
            out: ::core::option::Option<&mut dyn #any>,
        ) -> bool {
            #[allow(unused_imports)]
            use #private::{DupNoClone as _, DupViaClone as _};
            ((&&#private::Dup::<#ty>::new()).clone_fn())(value, out)
        }
        static #ops: #value_ops = #of(#type_name, #dup).cloning(#clone);
    }
}

/// Where a step's data parameter gets its value, as the entry takes it.
enum ParamFeed<'a> {
    /// A value (the input or a parent's output), deserialized with these ops.
    Value(&'a Ident),
    /// The output of a conditional parent (its ops and its type `T`): the parameter
    /// is an `Option<T>`, `None` when the parent was skipped.
    Optional(&'a Ident, &'a Type),
    /// One element of a map step's `Vec`, with the element's ops.
    Element(Ident),
}

/// The type-erased entry of step `i`: takes each input as its typed parameter,
/// evaluates the `when` predicate if any, calls the user's function in signature
/// order and wraps the output.
fn entry_tokens(
    self_ty: &Type,
    step: &Step,
    i: usize,
    ops: &Ident,
    params: &[ParamFeed<'_>],
) -> TokenStream {
    let private = paths::private();
    let step_inputs = paths::step_inputs();
    let context_source = paths::context_source();
    let step_value = paths::step_value();
    let step_output = paths::step_output();
    let boxed = paths::boxed();
    let result = paths::result();
    let entry = format_ident!("__pgflow_entry_{}", i);
    let fn_name = &step.name;
    let out_ty = output(step);

    let mut takes = Vec::new();
    let mut call_args = Vec::new();
    let mut data_vars = Vec::new();
    let mut k = 0_usize;
    for arg in &step.args {
        match arg {
            Arg::Data(p) => {
                let var = format_ident!("__pgflow_arg_{}", k);
                let ty = &p.ty;
                let pname = p.name.to_string();
                // an input that does not fit fails the attempt before the call
                let or_fail = |take: TokenStream| {
                    quote! {
                        match #take {
                            #result::Ok(__pgflow_v) => __pgflow_v,
                            #result::Err(__pgflow_e) => return #private::failed(__pgflow_e),
                        }
                    }
                };
                let take_value = |ops: &Ident| {
                    let take = or_fail(quote!(__pgflow_inputs.take::<#ty>(#k, #pname, &#ops)));
                    quote!(let #var = #take;)
                };
                takes.push(match &params[k] {
                    ParamFeed::Value(ops) => take_value(ops),
                    ParamFeed::Element(ops) => take_value(ops),
                    ParamFeed::Optional(from_ops, from_ty) => {
                        // The conversion is the check that the parameter is an
                        // `Option<T>`, spanned at the parameter's type.
                        let span = ty.span();
                        let from = respan(quote!(#from_ty), span);
                        let to = respan(quote!(#ty), span);
                        let convert = quote_spanned!(span=> ::pgflow::__private::optional_input::<#to, #from>);
                        let take = or_fail(quote!(
                            __pgflow_inputs.take_optional::<#from_ty>(#k, #pname, &#from_ops)
                        ));
                        quote!(let #var: #ty = #convert(#take);)
                    }
                });
                call_args.push(quote!(#var));
                data_vars.push(var);
                k += 1;
            }
            Arg::Context => call_args.push(quote!(&__pgflow_ctx)),
            Arg::Transaction(_) => call_args.push(quote!(__pgflow_tx_ref)),
        }
    }
    let inputs_binding = takes.is_empty().then(|| quote!(let _ = __pgflow_inputs;));
    let predicate = step
        .attr
        .when
        .as_ref()
        .map(|(_, path)| predicate_tokens(self_ty, path, &data_vars));
    // A transactional step borrows the lent transaction for its attempt (after its
    // predicate: a skipped step borrows nothing); it goes back when the entry ends.
    let borrow = step.transaction().map(|t| {
        let get = quote_spanned!(t.span()=> __pgflow_tx.get::<#t>());
        quote! {
            let mut __pgflow_tx = ::pgflow::__private::Borrowed::take(&__pgflow_ctx)?;
            let __pgflow_tx_ref: &mut #t = #get?;
        }
    });
    let err_span = step
        .error
        .as_ref()
        .map_or_else(|| output(step).span(), Spanned::span);
    let into_err = quote_spanned!(err_span=> ::pgflow::__private::into_step_error(__pgflow_err));
    // A subflow hands the executor the child to run (its output is the step's).
    let wrap = match &step.subflow {
        Some((w, _)) => {
            let start = quote_spanned!(w.span()=> ::pgflow::__private::subflow_start::<#w>);
            quote!(#result::Ok(#step_output::Subflow(#start(__pgflow_out))))
        }
        None => {
            quote!(#result::Ok(#step_output::Completed(#step_value::typed(__pgflow_out, &#ops))))
        }
    };
    // The context is made only for a step that takes it (or a transaction, which
    // it lends): a step that takes neither costs no context.
    let context = if step.takes_context() || step.transaction().is_some() {
        quote!(let __pgflow_ctx = __pgflow_ctx.into_context();)
    } else {
        quote!(let _ = __pgflow_ctx;)
    };
    quote! {
        fn #entry(
            __pgflow_inputs: &mut #step_inputs,
            __pgflow_ctx: #context_source<'_>,
        ) -> #private::StepFuture {
            #inputs_binding
            #(#takes)*
            #context
            #boxed::pin(async move {
                #predicate
                #borrow
                let __pgflow_out: #out_ty = match <#self_ty>::#fn_name(#(#call_args),*).await {
                    #result::Ok(__pgflow_value) => __pgflow_value,
                    #result::Err(__pgflow_err) => return #result::Err(#into_err),
                };
                #wrap
            })
        }
    }
}

/// `if !predicate(&arg0, &arg1, ..) { return Ok(Skipped) }`, with the call spanned at
/// the user's predicate path so that rustc reports a wrong signature there.
fn predicate_tokens(self_ty: &Type, path: &syn::Path, vars: &[Ident]) -> TokenStream {
    let result = paths::result();
    let step_output = paths::step_output();
    let span = path
        .segments
        .last()
        .map_or_else(|| path.span(), |s| s.ident.span());
    let callee = self_path(self_ty, path);
    // The arguments carry the predicate's span too (an argument of the wrong type is
    // reported at the predicate, not at `#[workflow]`).
    let args = vars.iter().map(|v| {
        let v = Ident::new(&v.to_string(), span);
        quote_spanned!(span=> &#v)
    });
    let call = quote_spanned!(span=> #callee(#(#args),*));
    quote! {
        let __pgflow_keep: bool = #call;
        if !__pgflow_keep {
            return #result::Ok(#step_output::Skipped);
        }
    }
}

/// `path` as the expansion names it: `Self::f` names the workflow type, outside the
/// impl block.
fn self_path(self_ty: &Type, path: &syn::Path) -> TokenStream {
    match path.segments.first() {
        Some(first) if first.ident == "Self" && path.leading_colon.is_none() => {
            let ty = respan(quote!(#self_ty), first.ident.span());
            let rest = path.segments.iter().skip(1);
            let lt = quote_spanned!(first.ident.span()=> <);
            let gt = quote_spanned!(first.ident.span()=> >);
            quote!(#lt #ty #gt #(:: #rest)*)
        }
        _ => quote!(#path),
    }
}

/// Code that exists only to be type-checked, with spans on the user's tokens: every
/// parameter's type is the type of what feeds it (error at the parameter: "expected
/// `Routed`, found `Completion`"), and what a map step maps over is a `Vec` (error at
/// `map`). Parameters fed by a conditional step are checked by their conversion in
/// the entry. The `StepData` bound is checked once per type by `ValueOps::of`.
fn type_checks(wf: &Workflow, g: &Graph, types: &Types<'_>) -> TokenStream {
    let mut edges = Vec::new();
    for (i, step) in wf.steps.iter().enumerate() {
        for (k, (p, src)) in step.data_params().zip(&g.sources[i]).enumerate() {
            if (i, k) == g.input {
                continue;
            }
            let from: &Type = match src {
                // the payload is typed by the parameter itself
                Source::Signal => continue,
                Source::Input => &types.input.ty,
                Source::Step(s) if wf.steps[*s].attr.when.is_some() => continue,
                Source::Step(s) => &types.seen[*s].ty,
            };
            let to = &p.ty;
            // Both types carry the parameter's span, so rustc reports it there.
            let span = p.ty.span();
            if g.mapped[i] == Some(k) {
                if let Some(element) = vec_element(from) {
                    let element = respan(quote!(#element), span);
                    let check =
                        quote_spanned!(span=> ::pgflow::__private::same_type::<#element, #to>());
                    edges.push(quote!(#check;));
                } else if let Some(map) = &step.attr.map {
                    // Not written as a `Vec`: rustc says whether it is one (at `map`).
                    let map_span = map.span();
                    let from = respan(quote!(#from), map_span);
                    let check =
                        quote_spanned!(map_span=> ::pgflow::__private::map_item::<#from, #to>());
                    edges.push(quote!(#check;));
                }
                continue;
            }
            let from = respan(quote!(#from), span);
            let check = quote_spanned!(span=> ::pgflow::__private::same_type::<#from, #to>());
            edges.push(quote!(#check;));
        }
    }
    if edges.is_empty() {
        return TokenStream::new();
    }
    quote!(const _: () = { #(#edges)* };)
}

/// `tokens` with every span set to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tt| {
            if let TokenTree::Group(g) = &tt {
                let mut group = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                tt = TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}
