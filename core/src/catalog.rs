//! What the kernel and image catalogs share: the rules every entry follows
//! and how relative URLs resolve against a base URL (a mirror's, in config).

use std::collections::HashSet;

use crate::model::validate_artifact_name;

/// The fields every catalog entry has.
pub trait CatalogItem {
    /// Entry name (also the local name by default).
    fn name(&self) -> &str;
    /// Absolute URL, or relative to the catalog's base URL.
    fn url(&self) -> &str;
    /// Lowercase hex sha256 of the download.
    fn sha256(&self) -> &str;
    /// Marked `default = true`.
    fn is_default(&self) -> bool;
}

/// Checks the shared rules for `entries` of a `kind` (`kernel`, `image`)
/// catalog: valid unique names, 64-hex-digit sha256, a URL, at most one
/// default. The error says which entry and what is wrong.
pub fn check_entries<E: CatalogItem>(kind: &'static str, entries: &[E]) -> Result<(), String> {
    let mut names = HashSet::new();
    for e in entries {
        validate_artifact_name(kind, e.name()).map_err(|err| err.to_string())?;
        if !names.insert(e.name()) {
            return Err(format!("{kind} {:?} is listed twice", e.name()));
        }
        let hex = e.sha256().len() == 64
            && e.sha256()
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err(format!(
                "{kind} {:?} needs a sha256 of 64 lowercase hex digits",
                e.name()
            ));
        }
        if e.url().is_empty() {
            return Err(format!("{kind} {:?} has an empty url", e.name()));
        }
    }
    if entries.iter().filter(|e| e.is_default()).count() > 1 {
        return Err(format!("more than one {kind} is marked default"));
    }
    Ok(())
}

/// The absolute URL of `url`: itself if absolute, else joined to `base`;
/// `None` when it is relative and there is no base.
pub fn resolve_url(base: Option<&str>, url: &str) -> Option<String> {
    if url.contains("://") {
        return Some(url.to_string());
    }
    base.map(|b| {
        format!(
            "{}/{}",
            b.trim_end_matches('/'),
            url.trim_start_matches('/')
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(&'static str, &'static str, &'static str, bool);
    impl CatalogItem for E {
        fn name(&self) -> &str {
            self.0
        }
        fn url(&self) -> &str {
            self.1
        }
        fn sha256(&self) -> &str {
            self.2
        }
        fn is_default(&self) -> bool {
            self.3
        }
    }
    const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn shared_rules_name_the_entry() {
        assert!(check_entries("image", &[E("a", "u", SHA, true), E("b", "u", SHA, false)]).is_ok());
        let dup = check_entries("image", &[E("a", "u", SHA, false), E("a", "u", SHA, false)])
            .unwrap_err();
        assert!(dup.contains("\"a\" is listed twice"), "{dup}");
        let sha = check_entries("kernel", &[E("a", "u", "ABC", false)]).unwrap_err();
        assert!(sha.contains("kernel \"a\" needs a sha256"), "{sha}");
        assert!(
            check_entries("image", &[E("a", "", SHA, false)])
                .unwrap_err()
                .contains("empty url")
        );
        assert!(check_entries("image", &[E("../a", "u", SHA, false)]).is_err());
        let two =
            check_entries("image", &[E("a", "u", SHA, true), E("b", "u", SHA, true)]).unwrap_err();
        assert!(two.contains("more than one image"), "{two}");
    }

    #[test]
    fn relative_urls_resolve_against_the_base() {
        assert_eq!(
            resolve_url(Some("http://m/x/"), "/k/a.tar.zst").as_deref(),
            Some("http://m/x/k/a.tar.zst")
        );
        assert_eq!(
            resolve_url(None, "https://abs/a").as_deref(),
            Some("https://abs/a")
        );
        assert_eq!(resolve_url(None, "k/a"), None);
    }
}
