//! The kernel catalog: kernels `banger kernel pull` can fetch, embedded in
//! the binary (`core/catalog/kernels.toml`), with a base URL that config can
//! point at a mirror.

use serde::Deserialize;

use super::{CatalogError, Sources};

const KIND: &str = "kernel";
const EMBEDDED: &str = include_str!("../../../catalog/kernels.toml");

/// One kernel the catalog offers: published (`oci`, `url`) and/or built
/// locally from a `recipe`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawEntry")]
pub struct CatalogEntry {
    /// The kernel's name (also its local name once pulled).
    pub name: String,
    /// Architecture (`x86_64`).
    pub arch: String,
    /// Distribution or build family.
    pub distro: String,
    /// Kernel version.
    pub version: String,
    /// One line for `banger kernel list --available`.
    pub description: String,
    /// Whether `vm create` uses this kernel when none is given.
    pub default: bool,
    /// Where it comes from.
    pub sources: Sources,
}

/// A `[[kernel]]` table as written; unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    arch: String,
    distro: String,
    version: String,
    description: String,
    #[serde(default)]
    default: bool,
    #[serde(default)]
    oci: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    recipe: Option<String>,
}

impl From<RawEntry> for CatalogEntry {
    fn from(r: RawEntry) -> Self {
        CatalogEntry {
            name: r.name,
            arch: r.arch,
            distro: r.distro,
            version: r.version,
            description: r.description,
            default: r.default,
            sources: Sources {
                oci: r.oci,
                url: r.url,
                sha256: r.sha256,
                size: r.size,
                recipe: r.recipe,
            },
        }
    }
}

/// The set of pullable kernels and where relative URLs point.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Base for relative entry URLs.
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default, rename = "kernel")]
    entries: Vec<CatalogEntry>,
}

impl Catalog {
    /// The catalog compiled into this binary.
    pub fn embedded() -> Result<Catalog, CatalogError> {
        Catalog::parse(EMBEDDED)
    }

    /// Parses and checks catalog TOML: `base_url` and `[[kernel]]` tables.
    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        let catalog: Catalog =
            toml::from_str(text).map_err(|e| CatalogError::parse(KIND, e.to_string()))?;
        super::check_entries("kernel", &catalog.entries, super::recipes::KERNEL_RECIPES)
            .map_err(|why| CatalogError::parse(KIND, why))?;
        Ok(catalog)
    }

    /// The same catalog with relative URLs resolved against `base_url`
    /// (the config override for mirrors and tests).
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Catalog {
        self.base_url = Some(base_url.into());
        self
    }

    /// Every entry, in file order.
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn find(&self, name: &str) -> Result<&CatalogEntry, CatalogError> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| CatalogError::NotInCatalog {
                kind: KIND,
                name: name.to_owned(),
            })
    }

    /// The entry marked `default = true`, if any.
    pub fn default_entry(&self) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.default)
    }

    /// The absolute URL of an entry's tarball, `None` when it has no URL.
    pub fn url_of(&self, entry: &CatalogEntry) -> Result<Option<String>, CatalogError> {
        let Some(url) = &entry.sources.url else {
            return Ok(None);
        };
        super::resolve_url(self.base_url.as_deref(), url)
            .map(Some)
            .ok_or_else(|| CatalogError::NoBaseUrl {
                kind: KIND,
                name: entry.name.clone(),
                url: url.clone(),
            })
    }
}

impl super::CatalogItem for CatalogEntry {
    fn name(&self) -> &str {
        &self.name
    }
    fn sources(&self) -> &Sources {
        &self.sources
    }
    fn is_default(&self) -> bool {
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn entry(name: &str, url: &str, default: bool) -> String {
        format!(
            "[[kernel]]\nname = {name:?}\narch = \"x86_64\"\ndistro = \"d\"\nversion = \"1\"\nurl = {url:?}\nsha256 = {SHA:?}\nsize = 10\ndescription = \"x\"\ndefault = {default}\n"
        )
    }

    #[test]
    fn embedded_catalog_parses_with_one_default() {
        let c = Catalog::embedded().unwrap();
        assert!(!c.entries().is_empty());
        let d = c.default_entry().unwrap();
        // Every embedded entry names a real source: a recipe this binary
        // carries, or a published artifact pinned by digest.
        for e in c.entries() {
            assert!(
                e.sources.recipe.is_some() || e.sources.oci.is_some(),
                "{e:?}"
            );
            assert!(!e.sources.url.as_deref().unwrap_or("").contains(".invalid"));
        }
        assert!(
            d.sources
                .recipe
                .as_deref()
                .is_some_and(|r| crate::catalog::recipes::KERNEL_RECIPES.contains(&r))
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = format!("{}mirror = \"x\"\n", entry("a", "u", false));
        let err = Catalog::parse(&text).unwrap_err().to_string();
        assert!(err.contains("mirror"), "{err}");
    }

    #[test]
    fn resolves_relative_urls_against_the_override() {
        let text = format!(
            "base_url = \"https://a.example/x/\"\n{}",
            entry("k", "kernels/k.tar.zst", true)
        );
        let c = Catalog::parse(&text).unwrap();
        let k = c.find("k").unwrap().clone();
        assert_eq!(
            c.url_of(&k).unwrap().as_deref(),
            Some("https://a.example/x/kernels/k.tar.zst")
        );
        let c = c.with_base_url("http://127.0.0.1:1");
        assert_eq!(
            c.url_of(&k).unwrap().as_deref(),
            Some("http://127.0.0.1:1/kernels/k.tar.zst")
        );
    }

    #[test]
    fn rejects_bad_catalogs() {
        let two_defaults = format!("{}{}", entry("a", "u", true), entry("b", "u", true));
        let dup = format!("{}{}", entry("a", "u", false), entry("a", "u", false));
        let bad_name = entry("../a", "u", false);
        let bad_sha = entry("a", "u", false).replace(SHA, "abc");
        for text in [two_defaults, dup, bad_name, bad_sha] {
            assert!(Catalog::parse(&text).is_err(), "{text}");
        }
        let c = Catalog::parse(&entry("a", "rel", false)).unwrap();
        assert!(matches!(
            c.url_of(&c.entries()[0]),
            Err(CatalogError::NoBaseUrl { kind: KIND, .. })
        ));
        assert!(
            matches!(c.find("zz"), Err(CatalogError::NotInCatalog { name, .. }) if name == "zz")
        );
    }
}
