//! Generated reference pages: a test renders a section of a page under
//! `docs/` from the code's own lists and compares it with the committed
//! page; `TALLY_BLESS=1` writes the page instead. Sections sit between
//! `<!-- generated: NAME -->` and `<!-- end: NAME -->`; the prose around
//! them is written by hand.

use std::path::PathBuf;

/// `docs/NAME` in this checkout.
pub fn doc_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name)
}

/// Replaces every generated section of `docs/page` by its rendering in
/// `sections` (name, markdown) and checks the page is unchanged, or writes
/// it with `TALLY_BLESS=1`.
///
/// # Panics
/// When the page is missing a section or differs (with a diff).
pub fn check_page(page: &str, sections: &[(&str, String)]) {
    let path = doc_path(page);
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
    let mut text = committed.clone();
    for (name, body) in sections {
        let start = format!("<!-- generated: {name} -->\n");
        let end = format!("<!-- end: {name} -->");
        let from = text
            .find(&start)
            .unwrap_or_else(|| panic!("{page} has no `{}` line", start.trim()))
            + start.len();
        let to = from
            + text[from..]
                .find(&end)
                .unwrap_or_else(|| panic!("{page} has no `{end}` line"));
        text.replace_range(from..to, body);
    }
    if std::env::var_os("TALLY_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    if text != committed {
        let diff = similar::TextDiff::from_lines(&committed, &text);
        panic!(
            "docs/{page} is not what the code says (run with TALLY_BLESS=1 to rewrite it):\n{}",
            diff.unified_diff().header("committed", "from the code")
        );
    }
}

/// `text` safe in a markdown table cell.
pub fn cell(text: &str) -> String {
    text.replace('|', "\\|")
        .replace('*', "\\*")
        .replace('<', "&lt;")
        .replace('\n', " ")
}
