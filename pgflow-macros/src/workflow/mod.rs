//! `#[workflow]`: [`parse`] the impl block into a model, [`check`] the model across
//! steps (accumulating every error), then [`expand`] a valid model.

pub(crate) mod check;
pub(crate) mod expand;
pub(crate) mod parse;

use proc_macro2::TokenStream;
use quote::quote;

use crate::ctxt::Ctxt;

/// The whole `#[workflow]` pipeline. On any error the user's items are still
/// emitted (with the `#[step]` markers removed) next to the errors, so that
/// rust-analyzer and the rest of the crate keep working.
pub(crate) fn workflow(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut cx = Ctxt::default();
    let item_impl: syn::ItemImpl = match syn::parse2(item.clone()) {
        Ok(i) => i,
        Err(_) => {
            cx.error_spanned_by(
                &item,
                "#[workflow] goes on an `impl` block: `#[workflow] impl MyWorkflow { #[step] async fn .. }`",
            );
            let errors = cx.into_compile_errors();
            return quote!(#item #errors);
        }
    };
    let attr = crate::attr::parse_workflow_attr(args, &mut cx);
    let model = parse::parse(item_impl, attr, &mut cx);
    let graph = check::check(&model, &mut cx);
    let user_items = &model.item;
    match graph {
        Some(graph) if !cx.has_errors() => {
            let generated = expand::expand(&model, &graph);
            quote!(#user_items #generated)
        }
        _ => {
            // The placeholder keeps code that names the workflow from reporting
            // follow-on errors ("is not a workflow") at every call site.
            let placeholder = expand::placeholder(&model);
            let errors = cx.into_compile_errors();
            quote!(#user_items #placeholder #errors)
        }
    }
}
