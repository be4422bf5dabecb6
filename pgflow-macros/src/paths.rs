//! Every runtime path the expansion names, in one table: all rooted at
//! `::pgflow`, most through `::pgflow::__private` (not public API), and std items
//! fully qualified, so the expansion works whatever the user's module imports.

use proc_macro2::TokenStream;
use quote::quote;

pub(crate) fn private() -> TokenStream {
    quote!(::pgflow::__private)
}
pub(crate) fn workflow_trait() -> TokenStream {
    quote!(::pgflow::Workflow)
}
pub(crate) fn workflow_def() -> TokenStream {
    quote!(::pgflow::WorkflowDef)
}
pub(crate) fn step_def() -> TokenStream {
    quote!(::pgflow::StepDef)
}
pub(crate) fn step_options() -> TokenStream {
    quote!(::pgflow::StepOptions)
}
pub(crate) fn param() -> TokenStream {
    quote!(::pgflow::Param)
}
pub(crate) fn param_source() -> TokenStream {
    quote!(::pgflow::ParamSource)
}
pub(crate) fn value_ops() -> TokenStream {
    quote!(::pgflow::__private::ValueOps)
}
pub(crate) fn step_output() -> TokenStream {
    quote!(::pgflow::__private::StepOutput)
}
pub(crate) fn map_ops() -> TokenStream {
    quote!(::pgflow::__private::MapOps)
}
pub(crate) fn vec() -> TokenStream {
    quote!(::std::vec::Vec)
}
pub(crate) fn option() -> TokenStream {
    quote!(::core::option::Option)
}
pub(crate) fn step_error() -> TokenStream {
    quote!(::pgflow::StepError)
}
pub(crate) fn step_value() -> TokenStream {
    quote!(::pgflow::__private::StepValue)
}
pub(crate) fn step_inputs() -> TokenStream {
    quote!(::pgflow::__private::StepInputs)
}
pub(crate) fn context_source() -> TokenStream {
    quote!(::pgflow::__private::ContextSource)
}
pub(crate) fn duration() -> TokenStream {
    quote!(::core::time::Duration)
}
pub(crate) fn result() -> TokenStream {
    quote!(::core::result::Result)
}
pub(crate) fn any() -> TokenStream {
    quote!(::core::any::Any)
}
pub(crate) fn boxed() -> TokenStream {
    quote!(::std::boxed::Box)
}
pub(crate) fn signal() -> TokenStream {
    quote!(::pgflow::Signal)
}
pub(crate) fn signal_def() -> TokenStream {
    quote!(::pgflow::SignalDef)
}
