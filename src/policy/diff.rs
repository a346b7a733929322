//! Line diffs between policy versions: for people (`tally ctl policy
//! diff`) and for the audit record of every change. Pure.

/// Longest diff text an audit record carries; the counts are always
/// exact.
pub const MAX_AUDIT_DIFF: usize = 8 * 1024;

/// What changed between two versions of a policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDiff {
    /// Unified diff (3 lines of context), empty when nothing changed.
    pub text: String,
    /// Lines added.
    pub added: usize,
    /// Lines removed.
    pub removed: usize,
}

impl PolicyDiff {
    /// Whether the documents are identical.
    pub fn is_empty(&self) -> bool {
        self.added == 0 && self.removed == 0
    }

    /// The text cut to at most `max` bytes at a line boundary, marked when
    /// cut.
    pub fn text_within(&self, max: usize) -> String {
        if self.text.len() <= max {
            return self.text.clone();
        }
        let cut = self.text[..max].rfind('\n').map_or(0, |i| i + 1);
        format!(
            "{}… ({} more bytes)\n",
            &self.text[..cut],
            self.text.len() - cut
        )
    }
}

/// The diff from `old` (named `old_name`) to `new`.
pub fn diff(old: &str, new: &str, old_name: &str, new_name: &str) -> PolicyDiff {
    use similar::{ChangeTag, TextDiff};
    let lines = TextDiff::from_lines(old, new);
    let (mut added, mut removed) = (0, 0);
    for change in lines.iter_all_changes() {
        match change.tag() {
            ChangeTag::Insert => added += 1,
            ChangeTag::Delete => removed += 1,
            ChangeTag::Equal => {}
        }
    }
    let text = if added + removed == 0 {
        String::new()
    } else {
        lines
            .unified_diff()
            .context_radius(3)
            .header(old_name, new_name)
            .to_string()
    };
    PolicyDiff {
        text,
        added,
        removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_line_is_one_removal_and_one_addition() {
        let old = "trust_domain: td\nissue:\n  - from: a\n    to: b\n";
        let new = "trust_domain: td\nissue:\n  - from: a\n    to: c\n";
        let d = diff(old, new, "v1", "v2");
        assert_eq!((d.added, d.removed), (1, 1));
        assert!(d.text.starts_with("--- v1\n+++ v2\n"), "{}", d.text);
        assert!(d.text.contains("-    to: b\n+    to: c\n"), "{}", d.text);
        assert!(!d.is_empty());
    }

    #[test]
    fn identical_documents_have_no_diff() {
        let d = diff("a\nb\n", "a\nb\n", "v1", "v2");
        assert!(d.is_empty());
        assert_eq!(d.text, "");
    }

    #[test]
    fn a_long_diff_is_cut_at_a_line_for_the_audit_record() {
        let old: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        let d = diff(&old, "", "v1", "v2");
        assert_eq!(d.removed, 2000);
        let cut = d.text_within(MAX_AUDIT_DIFF);
        assert!(cut.len() <= MAX_AUDIT_DIFF + 40, "{}", cut.len());
        assert!(cut.ends_with("more bytes)\n"), "{cut:.100}");
        let body = cut.rsplit_once("… (").unwrap().0;
        assert!(body.ends_with('\n'));
    }
}
