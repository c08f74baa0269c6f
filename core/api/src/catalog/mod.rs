//! What the kernel and image catalogs share: where an entry's artifact comes
//! from ([`Sources`]), the rules every entry follows, and how relative URLs
//! resolve against a base URL (a mirror's, in config).
//!
//! An entry names at least one real source: an OCI artifact pinned by
//! manifest digest (`oci`, written by the release pipeline), a `.tar.zst`
//! download with its sha256 (`url`), and/or a local build `recipe` the
//! binary carries. Nothing else counts, so a catalog can never point at a
//! placeholder.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::model::validate_artifact_name;

pub mod images;
pub mod kernels;
pub mod recipes;

/// A catalog that does not parse, or an entry it does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// The catalog text is invalid.
    #[error("Invalid {kind} catalog: {why}")]
    Parse {
        /// `kernel` or `image`.
        kind: &'static str,
        /// What is wrong, naming the entry.
        why: String,
    },
    /// The catalog has no entry of that name.
    #[error("No {kind} named {name:?} in the {kind} catalog; see `banger {kind} list --available`")]
    NotInCatalog {
        /// `kernel` or `image`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// An entry's relative URL cannot be resolved.
    #[error(
        "The {kind} {name:?} has the relative URL {url:?} but the {kind} catalog has no base URL; set one in config"
    )]
    NoBaseUrl {
        /// `kernel` or `image`.
        kind: &'static str,
        /// The entry.
        name: String,
        /// Its relative URL.
        url: String,
    },
}

impl CatalogError {
    /// Which catalog: `kernel` or `image`.
    pub fn kind(&self) -> &'static str {
        match self {
            CatalogError::Parse { kind, .. }
            | CatalogError::NotInCatalog { kind, .. }
            | CatalogError::NoBaseUrl { kind, .. } => kind,
        }
    }

    fn parse(kind: &'static str, why: impl Into<String>) -> Self {
        CatalogError::Parse {
            kind,
            why: why.into(),
        }
    }
}

/// Where one catalog entry's artifact can come from, in the order they are
/// tried: the published artifact (`oci`, then `url`), then a local build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sources {
    /// OCI artifact reference pinned by digest (`host/repo@sha256:<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    /// Tarball URL: absolute, or relative to the catalog's base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Hex sha256 of the tarball; required with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Size of the tarball in bytes; 0 if unknown (not checked).
    #[serde(default)]
    pub size: u64,
    /// A local build recipe this binary carries (`banger kernel build`,
    /// `banger image build`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
}

impl Sources {
    /// Whether a published artifact (OCI or URL) is listed.
    pub fn is_published(&self) -> bool {
        self.oci.is_some() || self.url.is_some()
    }

    /// A short label for listings: `oci`, `url`, `recipe` joined by `+`.
    pub fn label(&self) -> String {
        let mut kinds = Vec::new();
        if self.oci.is_some() {
            kinds.push("oci");
        }
        if self.url.is_some() {
            kinds.push("url");
        }
        if self.recipe.is_some() {
            kinds.push("build");
        }
        kinds.join("+")
    }
}

/// The fields every catalog entry has.
pub trait CatalogItem {
    /// Entry name (also the local name by default).
    fn name(&self) -> &str;
    /// Where its artifact comes from.
    fn sources(&self) -> &Sources;
    /// Marked `default = true`.
    fn is_default(&self) -> bool;
}

/// Whether `s` is 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `reference` is an OCI reference pinned by a sha256 digest.
pub fn is_pinned_oci(reference: &str) -> bool {
    reference
        .rsplit_once("@sha256:")
        .is_some_and(|(repo, hex)| !repo.is_empty() && is_sha256_hex(hex))
}

/// Checks the shared rules for `entries` of a `kind` (`kernel`, `image`)
/// catalog: valid unique names, at least one source, a sha256 with every
/// URL, OCI references pinned by digest, recipes among `recipes`, at most
/// one default. The error says which entry and what is wrong.
pub fn check_entries<E: CatalogItem>(
    kind: &'static str,
    entries: &[E],
    recipes: &[&str],
) -> Result<(), String> {
    let mut names = HashSet::new();
    for e in entries {
        let name = e.name();
        validate_artifact_name(kind, name).map_err(|err| err.to_string())?;
        if !names.insert(name) {
            return Err(format!("{kind} {name:?} is listed twice"));
        }
        let s = e.sources();
        if !s.is_published() && s.recipe.is_none() {
            return Err(format!(
                "{kind} {name:?} names no source; give it `oci`, `url` + `sha256`, or `recipe`"
            ));
        }
        match (&s.url, &s.sha256) {
            (Some(url), _) if url.is_empty() => {
                return Err(format!("{kind} {name:?} has an empty url"));
            }
            (Some(_), Some(sha)) if is_sha256_hex(sha) => {}
            (Some(_), _) => {
                return Err(format!(
                    "{kind} {name:?} needs a sha256 of 64 lowercase hex digits"
                ));
            }
            (None, Some(_)) => {
                return Err(format!("{kind} {name:?} has a sha256 but no url"));
            }
            (None, None) => {}
        }
        if let Some(oci) = &s.oci
            && !is_pinned_oci(oci)
        {
            return Err(format!(
                "{kind} {name:?}: oci {oci:?} must be pinned by digest (REPO@sha256:<64 hex digits>)"
            ));
        }
        if let Some(r) = &s.recipe
            && !recipes.contains(&r.as_str())
        {
            return Err(format!(
                "{kind} {name:?}: unknown recipe {r:?}; this build of banger has: {}",
                recipes.join(", ")
            ));
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

    struct E(&'static str, Sources, bool);
    impl CatalogItem for E {
        fn name(&self) -> &str {
            self.0
        }
        fn sources(&self) -> &Sources {
            &self.1
        }
        fn is_default(&self) -> bool {
            self.2
        }
    }
    const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn url(u: &str, sha: &str) -> Sources {
        Sources {
            url: Some(u.into()),
            sha256: Some(sha.into()),
            ..Sources::default()
        }
    }

    fn e(name: &'static str, s: Sources, default: bool) -> E {
        E(name, s, default)
    }

    #[test]
    fn shared_rules_name_the_entry() {
        let ok = [e("a", url("u", SHA), true), e("b", url("u", SHA), false)];
        assert!(check_entries("image", &ok, &[]).is_ok());
        let dup = check_entries(
            "image",
            &[e("a", url("u", SHA), false), e("a", url("u", SHA), false)],
            &[],
        )
        .unwrap_err();
        assert!(dup.contains("\"a\" is listed twice"), "{dup}");
        let sha = check_entries("kernel", &[e("a", url("u", "ABC"), false)], &[]).unwrap_err();
        assert!(sha.contains("kernel \"a\" needs a sha256"), "{sha}");
        let empty = check_entries("image", &[e("a", url("", SHA), false)], &[]).unwrap_err();
        assert!(empty.contains("empty url"), "{empty}");
        assert!(check_entries("image", &[e("../a", url("u", SHA), false)], &[]).is_err());
        let two = check_entries(
            "image",
            &[e("a", url("u", SHA), true), e("b", url("u", SHA), true)],
            &[],
        )
        .unwrap_err();
        assert!(two.contains("more than one image"), "{two}");
    }

    #[test]
    fn an_entry_needs_a_real_source() {
        let none =
            check_entries("kernel", &[e("k", Sources::default(), true)], &["r"]).unwrap_err();
        assert!(none.contains("kernel \"k\" names no source"), "{none}");
        let sha_only = Sources {
            sha256: Some(SHA.into()),
            recipe: Some("r".into()),
            ..Sources::default()
        };
        let err = check_entries("kernel", &[e("k", sha_only, false)], &["r"]).unwrap_err();
        assert!(err.contains("a sha256 but no url"), "{err}");
        let recipe = Sources {
            recipe: Some("debian".into()),
            ..Sources::default()
        };
        assert!(check_entries("kernel", &[e("k", recipe.clone(), true)], &["debian"]).is_ok());
        let unknown = check_entries("kernel", &[e("k", recipe, true)], &["other"]).unwrap_err();
        assert!(
            unknown.contains("unknown recipe \"debian\"") && unknown.contains("has: other"),
            "{unknown}"
        );
    }

    #[test]
    fn oci_sources_must_be_pinned_by_digest() {
        let oci = |r: &str| Sources {
            oci: Some(r.into()),
            ..Sources::default()
        };
        let pinned = format!("127.0.0.1:5000/banger/kernel@sha256:{SHA}");
        assert!(check_entries("kernel", &[e("k", oci(&pinned), false)], &[]).is_ok());
        for bad in [
            "127.0.0.1:5000/banger/kernel:latest".to_string(),
            format!("repo@sha256:{}", &SHA[1..]),
            format!("@sha256:{SHA}"),
            format!("repo@sha512:{SHA}"),
        ] {
            let err = check_entries("kernel", &[e("k", oci(&bad), false)], &[]).unwrap_err();
            assert!(err.contains("must be pinned by digest"), "{bad}: {err}");
        }
    }

    #[test]
    fn source_labels_list_what_is_there() {
        let s = Sources {
            oci: Some("x".into()),
            recipe: Some("r".into()),
            ..Sources::default()
        };
        assert_eq!(s.label(), "oci+build");
        assert!(s.is_published());
        assert!(!Sources::default().is_published());
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
