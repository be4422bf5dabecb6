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
use super::parse::{Arg, Step, Workflow, snake_case, type_string};
use crate::attr::RetryOptions;
use crate::paths;

const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_BACKOFF_MS: u64 = 1_000;

struct Options {
    max_attempts: u32,
    timeout_ms: u64,
    backoff_ms: u64,
    priority: i16,
}

impl Options {
    fn merge(own: &RetryOptions, fallback: &Options) -> Options {
        Options {
            max_attempts: own.max_attempts.unwrap_or(fallback.max_attempts),
            timeout_ms: own.timeout.unwrap_or(fallback.timeout_ms),
            backoff_ms: own.backoff.unwrap_or(fallback.backoff_ms),
            priority: own.priority.unwrap_or(fallback.priority),
        }
    }

    fn tokens(&self) -> TokenStream {
        let step_options = paths::step_options();
        let duration = paths::duration();
        let Options {
            max_attempts,
            timeout_ms,
            backoff_ms,
            priority,
        } = self;
        quote! {
            #step_options {
                max_attempts: #max_attempts,
                timeout: #duration::from_millis(#timeout_ms),
                backoff: #duration::from_millis(#backoff_ms),
                priority: #priority,
            }
        }
    }
}

pub(crate) fn expand(wf: &Workflow, g: &Graph) -> TokenStream {
    let private = paths::private();
    let self_ty = &wf.self_ty;
    let steps = &wf.steps;

    let name = wf.attr.name.as_ref().map_or_else(
        || {
            snake_case(
                &wf.type_ident
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        },
        syn::LitStr::value,
    );
    let version = wf.attr.version.unwrap_or(1);
    let queue = wf
        .attr
        .queue
        .as_ref()
        .map_or_else(|| "default".to_owned(), syn::LitStr::value);
    let defaults = Options::merge(
        &wf.attr.retry,
        &Options {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            backoff_ms: DEFAULT_BACKOFF_MS,
            priority: 0,
        },
    );

    let input_ty = &data_param(&steps[g.input.0], g.input.1).ty;
    let outputs: Vec<&Type> = steps.iter().map(output).collect();
    let output_ty = outputs[g.terminal];

    // ValueOps of the input and of each step's output.
    let input_ops = format_ident!("__PGFLOW_OPS_INPUT");
    let step_ops: Vec<Ident> = (0..steps.len())
        .map(|i| format_ident!("__PGFLOW_OPS_{}", i))
        .collect();
    let mut value_ops = value_ops_tokens(&input_ops, input_ty);
    for (ops, ty) in step_ops.iter().zip(&outputs) {
        value_ops.extend(value_ops_tokens(ops, ty));
    }

    let entries: Vec<TokenStream> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let param_ops: Vec<&Ident> = g.sources[i]
                .iter()
                .map(|src| match src {
                    Source::Input => &input_ops,
                    Source::Step(p) => &step_ops[*p],
                })
                .collect();
            entry_tokens(self_ty, s, i, &step_ops[i], &param_ops)
        })
        .collect();

    let step_def = paths::step_def();
    let step_kind = paths::step_kind();
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
            };
            quote!(#param { name: #pname, source: #source, type_name: #tname })
        });
        let takes_context = s.takes_context();
        let options = Options::merge(&s.attr.retry, &defaults).tokens();
        let ops = &step_ops[i];
        let entry = format_ident!("__pgflow_entry_{}", i);
        quote! {
            #private::step_def(#private::StepParts {
                name: #step_name,
                index: #i,
                parents: &[#(#parents),*],
                params: &[#(#params),*],
                takes_context: #takes_context,
                kind: #step_kind::Single,
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

    let checks = type_checks(wf, g, input_ty, &outputs);

    quote! {
        const _: () = {
            #value_ops
            #(#entries)*

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
                steps: &__PGFLOW_STEPS,
                terminal: #terminal,
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
            }

            #private::inventory::submit! {
                #private::Registration(<#self_ty as #workflow_trait>::definition)
            }

            #checks
        };
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

/// A `static` `ValueOps` for `ty`, with its `duplicate` picked by autoref
/// specialization (`Clone` when the type has it, a JSON round trip otherwise).
fn value_ops_tokens(ops: &Ident, ty: &Type) -> TokenStream {
    let private = paths::private();
    let value_ops = paths::value_ops();
    let any = paths::any();
    let dup = format_ident!(
        "__pgflow_dup{}",
        ops.to_string()
            .to_lowercase()
            .trim_start_matches("__pgflow_ops")
    );
    let type_name = type_string(ty);
    // The one place that requires `T: StepData`, spanned at the user's type so a
    // type that is not (de)serializable is reported there.
    let of = quote_spanned!(ty.span()=> ::pgflow::ValueOps::of::<#ty>);
    quote! {
        fn #dup(value: &(dyn #any + ::core::marker::Send)) -> #private::DupResult {
            #[allow(unused_imports)]
            use #private::{DupNoClone as _, DupViaClone as _};
            ((&&#private::Dup::<#ty>::new()).dup_fn())(value)
        }
        static #ops: #value_ops = #of(#type_name, #dup);
    }
}

/// The type-erased entry of step `i`: takes each input as its typed parameter,
/// calls the user's function in signature order and wraps the output.
fn entry_tokens(
    self_ty: &Type,
    step: &Step,
    i: usize,
    ops: &Ident,
    param_ops: &[&Ident],
) -> TokenStream {
    let private = paths::private();
    let step_inputs = paths::step_inputs();
    let step_context = paths::step_context();
    let step_value = paths::step_value();
    let boxed = paths::boxed();
    let result = paths::result();
    let entry = format_ident!("__pgflow_entry_{}", i);
    let fn_name = &step.name;
    let out_ty = output(step);

    let mut takes = Vec::new();
    let mut call_args = Vec::new();
    let mut k = 0_usize;
    for arg in &step.args {
        match arg {
            Arg::Data(p) => {
                let var = format_ident!("__pgflow_arg_{}", k);
                let ty = &p.ty;
                let pname = p.name.to_string();
                let from_ops = param_ops[k];
                takes.push(quote! {
                    let #var = __pgflow_inputs.take::<#ty>(#k, #pname, &#from_ops)?;
                });
                call_args.push(quote!(#var));
                k += 1;
            }
            Arg::Context => call_args.push(quote!(&__pgflow_ctx)),
        }
    }
    let inputs_binding = if takes.is_empty() {
        quote!(let _ = __pgflow_inputs;)
    } else {
        quote!(let mut __pgflow_inputs = __pgflow_inputs;)
    };
    let err_span = step
        .error
        .as_ref()
        .map_or_else(|| output(step).span(), Spanned::span);
    let into_err = quote_spanned!(err_span=> ::pgflow::__private::into_step_error(__pgflow_err));
    quote! {
        fn #entry(
            __pgflow_inputs: #step_inputs,
            __pgflow_ctx: #step_context,
        ) -> #private::StepFuture {
            #boxed::pin(async move {
                #inputs_binding
                #(#takes)*
                let __pgflow_out: #out_ty = match <#self_ty>::#fn_name(#(#call_args),*).await {
                    #result::Ok(__pgflow_value) => __pgflow_value,
                    #result::Err(__pgflow_err) => return #result::Err(#into_err),
                };
                #result::Ok(#step_value::typed(__pgflow_out, &#ops))
            })
        }
    }
}

/// Code that exists only to be type-checked, with spans on the user's tokens: every
/// parameter's type is the type of what feeds it (error at the parameter: "expected
/// `Routed`, found `Completion`"). The `StepData` bound is checked once per type by
/// `ValueOps::of`.
fn type_checks(wf: &Workflow, g: &Graph, input_ty: &Type, outputs: &[&Type]) -> TokenStream {
    let mut edges = Vec::new();
    for (i, step) in wf.steps.iter().enumerate() {
        for (k, (p, src)) in step.data_params().zip(&g.sources[i]).enumerate() {
            if (i, k) == g.input {
                continue;
            }
            let from: &Type = match src {
                Source::Input => input_ty,
                Source::Step(s) => outputs[*s],
            };
            let to = &p.ty;
            // Both types carry the parameter's span, so rustc reports it there.
            let span = p.ty.span();
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
