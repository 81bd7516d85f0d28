//! Prints the rule list as Markdown (the same text as `hearth jobspec rules`), for docs/jobspec.md.
fn main() {
    print!("{}", hearth_jobspec::rules::markdown_list());
}
