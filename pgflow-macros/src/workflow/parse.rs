//! Parses a `#[workflow]` impl block into the [`Workflow`] model: the workflow's
//! options and, for each `#[step]` function, its options, its data parameters, its
//! optional `&StepContext` and its output type. Signature mistakes are recorded in
//! the [`Ctxt`] at the offending token; the step stays in the model (with what could
//! be read) so the graph checks still run.

use syn::{
    FnArg, GenericArgument, Ident, ImplItem, ItemImpl, Pat, PathArguments, ReturnType, Type,
};

use crate::attr::{StepAttr, WorkflowAttr};
use crate::ctxt::Ctxt;

pub(crate) struct Workflow {
    /// The user's impl block with the `#[step]` markers removed.
    pub(crate) item: ItemImpl,
    pub(crate) self_ty: Type,
    /// The last path segment of the type: the default name is its snake case.
    pub(crate) type_ident: Option<Ident>,
    pub(crate) attr: WorkflowAttr,
    pub(crate) steps: Vec<Step>,
}

pub(crate) struct Step {
    pub(crate) name: Ident,
    pub(crate) attr: StepAttr,
    /// Parameters in signature order.
    pub(crate) args: Vec<Arg>,
    /// `T` of `Result<T, E>`; `None` when the return type is not a `Result`.
    pub(crate) output: Option<Type>,
    /// `E` of `Result<T, E>`, when written.
    pub(crate) error: Option<Type>,
    /// For a step returning `Result<Subflow<W>, E>`: `W`, and the type its children
    /// see, `<W as Workflow>::Output` (spanned at `W`).
    pub(crate) subflow: Option<(Type, Type)>,
    /// A parameter was rejected: binding checks would only add noise.
    pub(crate) param_errors: bool,
}

pub(crate) enum Arg {
    Data(Box<DataParam>),
    Context,
    /// `tx: &mut T`: the transaction the executor lends (its `T`).
    Transaction(Box<Type>),
}

pub(crate) struct DataParam {
    pub(crate) name: Ident,
    pub(crate) ty: Type,
}

impl Step {
    /// The data parameters, in signature order.
    pub(crate) fn data_params(&self) -> impl Iterator<Item = &DataParam> {
        self.args.iter().filter_map(|a| match a {
            Arg::Data(d) => Some(&**d),
            Arg::Context | Arg::Transaction(_) => None,
        })
    }

    /// The `T` of its `&mut T` transaction parameter, if it takes one.
    pub(crate) fn transaction(&self) -> Option<&Type> {
        self.args.iter().find_map(|a| match a {
            Arg::Transaction(t) => Some(&**t),
            _ => None,
        })
    }

    pub(crate) fn takes_context(&self) -> bool {
        self.args.iter().any(|a| matches!(a, Arg::Context))
    }
}

fn is_step_attr(attr: &syn::Attribute) -> bool {
    let segs: Vec<String> = attr
        .path()
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    matches!(segs.as_slice(), [s] if s == "step")
        || matches!(segs.as_slice(), [p, s] if p == "pgflow" && s == "step")
}

pub(crate) fn parse(mut item: ItemImpl, attr: WorkflowAttr, cx: &mut Ctxt) -> Workflow {
    if let Some((_, path, _)) = &item.trait_ {
        cx.error_spanned_by(
            path,
            "#[workflow] goes on an inherent `impl MyWorkflow` block, not on a trait impl",
        );
    }
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        cx.error_spanned_by(
            &item.generics,
            "a workflow cannot be generic: its steps' types are stored and must be concrete",
        );
    }
    let type_ident = match &*item.self_ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.clone()),
        _ => None,
    };
    if type_ident.is_none() {
        cx.error_spanned_by(
            &item.self_ty,
            "#[workflow] needs a named type: `pub struct MyWorkflow;` then `#[workflow] impl MyWorkflow { .. }`",
        );
    }

    let mut steps = Vec::new();
    for impl_item in &mut item.items {
        let attrs = match impl_item {
            ImplItem::Fn(f) => &mut f.attrs,
            ImplItem::Const(c) => &mut c.attrs,
            ImplItem::Type(t) => &mut t.attrs,
            ImplItem::Macro(m) => &mut m.attrs,
            _ => continue,
        };
        let mut step_attrs = Vec::new();
        attrs.retain(|a| {
            if is_step_attr(a) {
                step_attrs.push(a.clone());
                false
            } else {
                true
            }
        });
        let Some(first) = step_attrs.first() else {
            continue;
        };
        for extra in &step_attrs[1..] {
            cx.error_spanned_by(extra, "duplicate `#[step]` attribute");
        }
        let ImplItem::Fn(f) = impl_item else {
            cx.error_spanned_by(
                first,
                "#[step] goes on an `async fn` of the workflow's impl block",
            );
            continue;
        };
        let tokens = match &first.meta {
            syn::Meta::Path(_) => proc_macro2::TokenStream::new(),
            syn::Meta::List(l) => l.tokens.clone(),
            syn::Meta::NameValue(nv) => {
                cx.error_spanned_by(nv, "write `#[step]` or `#[step(option = value, ..)]`");
                proc_macro2::TokenStream::new()
            }
        };
        let step_attr = crate::attr::parse_step_attr(tokens, cx);
        steps.push(parse_step(&f.sig, step_attr, &item.self_ty, cx));
    }

    if steps.is_empty() {
        cx.error_spanned_by(
            &item.self_ty,
            "this workflow has no steps: mark at least one `async fn` of the block with `#[step]`",
        );
    }
    let self_ty = (*item.self_ty).clone();
    Workflow {
        item,
        self_ty,
        type_ident,
        attr,
        steps,
    }
}

fn parse_step(sig: &syn::Signature, attr: StepAttr, self_ty: &Type, cx: &mut Ctxt) -> Step {
    let name = sig.ident.clone();
    let mut param_errors = false;
    if sig.asyncness.is_none() {
        cx.error_spanned_by(
            sig.fn_token,
            format!("step `{name}` must be an `async fn`: write `async fn {name}(..)`"),
        );
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        cx.error_spanned_by(
            &sig.generics,
            format!(
                "step `{name}` cannot be generic: its input and output types are stored between steps and must be concrete"
            ),
        );
    }
    if let Some(v) = &sig.variadic {
        cx.error_spanned_by(v, "a step cannot be variadic");
    }

    let mut args = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => cx.error_spanned_by(
                r,
                format!("step `{name}` takes `self`: steps are associated functions; remove the receiver"),
            ),
            FnArg::Typed(pt) => {
                let ident = match &*pt.pat {
                    Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => pi.ident.clone(),
                    other => {
                        cx.error_spanned_by(
                            other,
                            "a step parameter must be a plain name: it binds by name to a parent step or `input`",
                        );
                        param_errors = true;
                        continue;
                    }
                };
                match classify_type(&pt.ty) {
                    ParamType::Context => {
                        if args.iter().any(|a| matches!(a, Arg::Context)) {
                            cx.error_spanned_by(&pt.ty, "a step takes at most one `&StepContext`");
                        }
                        args.push(Arg::Context);
                    }
                    ParamType::ContextByValue | ParamType::ContextMut => {
                        cx.error_spanned_by(
                            &pt.ty,
                            "take the step context by shared reference: `ctx: &StepContext`",
                        );
                        param_errors = true;
                    }
                    ParamType::Transaction(inner) => {
                        if args.iter().any(|a| matches!(a, Arg::Transaction(_))) {
                            cx.error_spanned_by(
                                &pt.ty,
                                "a step takes at most one transaction (`&mut` parameter): the writes it makes commit with the step's completion",
                            );
                            param_errors = true;
                        }
                        args.push(Arg::Transaction(Box::new(replace_self(&inner, self_ty))));
                    }
                    ParamType::Reference => {
                        cx.error_spanned_by(
                            &pt.ty,
                            "step parameters are owned values (deserialized from the parent's output): take `T`, not `&T` (the step context is recognized by its name: `&StepContext`; a transaction is a `&mut` parameter, e.g. `tx: &mut sqlx::PgConnection`)",
                        );
                        param_errors = true;
                    }
                    ParamType::ImplTrait => {
                        cx.error_spanned_by(
                            &pt.ty,
                            format!("step `{name}` cannot be generic: use a concrete type instead of `impl Trait`"),
                        );
                        param_errors = true;
                    }
                    ParamType::Data => args.push(Arg::Data(Box::new(DataParam {
                        name: ident,
                        ty: replace_self(&pt.ty, self_ty),
                    }))),
                }
            }
        }
    }

    let (output, error) = match &sig.output {
        ReturnType::Default => {
            cx.error_at(
                sig.paren_token.span.close(),
                format!(
                    "step `{name}` must return `Result<T, E>` where `E: Into<StepError>`, e.g. `-> Result<Routed, StepError>`"
                ),
            );
            (None, None)
        }
        ReturnType::Type(_, ty) => match result_args(ty) {
            Some((ok, err)) => (
                Some(replace_self(&ok, self_ty)),
                err.map(|e| replace_self(&e, self_ty)),
            ),
            None => {
                cx.error_spanned_by(
                    ty,
                    format!(
                        "step `{name}` must return `Result<T, E>` where `E: Into<StepError>`, e.g. `-> Result<Routed, StepError>`"
                    ),
                );
                (None, None)
            }
        },
    };
    let subflow = output.as_ref().and_then(subflow_workflow).map(|w| {
        let workflow_trait = crate::paths::workflow_trait();
        let seen =
            quote::quote_spanned!(syn::spanned::Spanned::span(w)=> <#w as #workflow_trait>::Output);
        let seen = syn::parse2(seen).unwrap_or_else(|_| w.clone());
        (w.clone(), seen)
    });
    Step {
        name,
        attr,
        args,
        output,
        error,
        subflow,
        param_errors,
    }
}

/// `W` of a type written `Subflow<W>` (or `pgflow::Subflow<W>`): what a step
/// returns to run workflow `W` as a child run.
fn subflow_workflow(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if p.qself.is_some() || seg.ident != "Subflow" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(t)] => Some(t),
        _ => None,
    }
}

/// `Self` written in a step's types means the workflow type; the expansion uses the
/// types outside the impl block, so `Self` is replaced by the type itself.
fn replace_self(ty: &Type, self_ty: &Type) -> Type {
    fn walk(tokens: proc_macro2::TokenStream, self_ty: &Type) -> proc_macro2::TokenStream {
        use proc_macro2::{Group, TokenTree};
        use quote::ToTokens;
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut out = proc_macro2::TokenStream::new();
        for (i, tt) in tokens.iter().enumerate() {
            match tt {
                TokenTree::Ident(id) if id == "Self" => {
                    // `Self::Assoc` needs `<Type>::Assoc`; a plain `Self` is the type.
                    let followed_by_path = matches!(tokens.get(i + 1), Some(TokenTree::Punct(p)) if p.as_char() == ':');
                    let ty = self_ty.to_token_stream();
                    if followed_by_path {
                        out.extend(quote::quote!(<#ty>));
                    } else {
                        out.extend(ty);
                    }
                }
                TokenTree::Group(g) => {
                    let mut new = Group::new(g.delimiter(), walk(g.stream(), self_ty));
                    new.set_span(g.span());
                    out.extend([TokenTree::Group(new)]);
                }
                other => out.extend([other.clone()]),
            }
        }
        out
    }
    let tokens = walk(quote::ToTokens::to_token_stream(ty), self_ty);
    syn::parse2(tokens).unwrap_or_else(|_| ty.clone())
}

enum ParamType {
    Data,
    Context,
    /// `&mut T` (not the context): a transaction of type `T`.
    Transaction(Box<Type>),
    ContextMut,
    ContextByValue,
    Reference,
    ImplTrait,
}

fn last_ident(ty: &Type) -> Option<&Ident> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| &s.ident),
        Type::Paren(p) => last_ident(&p.elem),
        Type::Group(g) => last_ident(&g.elem),
        _ => None,
    }
}

fn classify_type(ty: &Type) -> ParamType {
    match ty {
        Type::Reference(r) => {
            if last_ident(&r.elem).is_some_and(|i| i == "StepContext") {
                if r.mutability.is_some() {
                    ParamType::ContextMut
                } else {
                    ParamType::Context
                }
            } else if r.mutability.is_some() {
                ParamType::Transaction(r.elem.clone())
            } else {
                ParamType::Reference
            }
        }
        Type::ImplTrait(_) => ParamType::ImplTrait,
        _ if last_ident(ty).is_some_and(|i| i == "StepContext") => ParamType::ContextByValue,
        _ => ParamType::Data,
    }
}

/// `Result<T, E>`, or an alias whose name ends in `Result` and whose first argument
/// is the success type (`io::Result<T>`, `StepResult<T>`) -> `(T, Some(E) / None)`.
/// The expansion annotates the awaited value with `T`, so rustc checks the guess.
fn result_args(ty: &Type) -> Option<(Type, Option<Type>)> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if !seg.ident.to_string().ends_with("Result") {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    let ok = types.next()?;
    let err = types.next();
    Some((ok, err))
}

/// `LlmRequest` -> `llm_request`.
pub(crate) fn snake_case(name: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = name.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            let prev_upper = i > 0 && chars[i - 1].is_uppercase();
            if i > 0 && (prev_lower || (prev_upper && next_lower)) && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A readable rendering of a type (`Vec<u32>`, not `Vec < u32 >`).
pub(crate) fn type_string(ty: &Type) -> String {
    tokens_string(quote::quote!(#ty))
}

/// A readable rendering of tokens (a type or a path).
pub(crate) fn tokens_string(tokens: proc_macro2::TokenStream) -> String {
    let s = tokens.to_string();
    s.replace(" :: ", "::")
        .replace(":: ", "::")
        .replace(" ::", "::")
        .replace(" < ", "<")
        .replace("< ", "<")
        .replace(" <", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace("& ", "&")
        .replace("( ", "(")
        .replace(" )", ")")
        .replace("[ ", "[")
        .replace(" ]", "]")
        .replace(" ;", ";")
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn model(tokens: proc_macro2::TokenStream) -> (Workflow, Ctxt) {
        let mut cx = Ctxt::default();
        let item = syn::parse2(tokens).expect("an impl block");
        let wf = parse(item, WorkflowAttr::default(), &mut cx);
        (wf, cx)
    }

    #[test]
    fn snake_case_names() {
        assert_eq!(snake_case("LlmRequest"), "llm_request");
        assert_eq!(snake_case("HTTPRouter"), "http_router");
        assert_eq!(snake_case("Embedding2Stage"), "embedding2_stage");
        assert_eq!(snake_case("simple"), "simple");
    }

    #[test]
    fn type_strings_are_compact() {
        let ty: Type = syn::parse_quote!(std::collections::HashMap<String, Vec<u8>>);
        assert_eq!(
            type_string(&ty),
            "std::collections::HashMap<String, Vec<u8>>"
        );
    }

    #[test]
    fn parses_steps_context_and_outputs() {
        let (wf, cx) = model(quote! {
            impl W {
                #[step]
                async fn a(req: Req, ctx: &StepContext) -> Result<A, StepError> { body() }
                fn helper() {}
                #[pgflow::step(max_attempts = 2)]
                async fn b(a: A) -> anyhow::Result<B> { body() }
            }
        });
        assert!(!cx.has_errors());
        assert_eq!(wf.steps.len(), 2);
        assert!(wf.steps[0].takes_context());
        assert_eq!(wf.steps[0].data_params().count(), 1);
        let out = wf.steps[1].output.as_ref().map(type_string);
        assert_eq!(out.as_deref(), Some("B"));
        assert!(wf.steps[1].error.is_none());
        assert_eq!(wf.type_ident.map(|i| i.to_string()).as_deref(), Some("W"));
        // the #[step] markers are removed from the emitted items
        let emitted = wf
            .item
            .items
            .iter()
            .map(|i| quote!(#i).to_string())
            .collect::<String>();
        assert!(!emitted.contains("step"), "{emitted}");
    }

    #[test]
    fn signature_errors_accumulate() {
        let (wf, cx) = model(quote! {
            impl W {
                #[step]
                fn not_async(x: u8) -> Result<u8, E> { body() }
                #[step]
                async fn generic<T>(x: T) -> Result<T, E> { body() }
                #[step]
                async fn no_result(x: u8) -> u8 { x }
                #[step]
                async fn by_ref(x: &u8, ctx: StepContext) -> Result<u8, E> { body() }
            }
        });
        assert_eq!(wf.steps.len(), 4);
        let errors = cx.into_compile_errors().to_string();
        for needle in [
            "must be an `async fn`",
            "cannot be generic",
            "must return `Result<T, E>`",
            "take `T`, not `&T`",
            "by shared reference",
        ] {
            assert!(errors.contains(needle), "missing {needle:?} in {errors}");
        }
    }
}
