//! The one rule for names that become file paths and keys (namespaces, datasets, each half of an
//! adapter's `namespace/name`): 1-128 ASCII letters, digits, `.`, `_` or `-`, and neither `.` nor
//! `..`, so no name can step outside the directory it names.

/// The longest name part.
pub const MAX_LEN: usize = 128;

/// A name part that follows the rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(String);

impl Name {
    /// `s` as a name, if it follows the rule.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= MAX_LEN
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        ok.then(|| Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the rule allows, for error messages.
pub const RULE: &str = "1-128 letters, digits, '-', '_' or '.'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_keeps_names_inside_their_directory() {
        for ok in ["a", "ns-1", "my_data.v2", &"x".repeat(128)] {
            assert_eq!(
                Name::parse(ok).map(|n| n.as_str().to_string()),
                Some(ok.to_string())
            );
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(Name::parse(bad).is_none(), "{bad:?}");
        }
    }
}
