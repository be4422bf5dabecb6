//! Compile-time checks of `#[workflow]`/`#[step]`: every promised compile error has a
//! case in `tests/ui/fail/` with its expected `.stderr`; `tests/ui/pass/` must compile
//! (and run). Regenerate with `TRYBUILD=overwrite cargo test --test ui` and review
//! each `.stderr`: the caret must sit under the user's token.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
