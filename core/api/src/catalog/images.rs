//! The image catalog: images `banger image pull NAME` fetches (or builds
//! from a recipe), embedded in the binary (`core/catalog/images.toml`), with
//! a base URL that config can point at a mirror.

use serde::Deserialize;

use super::{CatalogError, Sources};
use crate::model::validate_artifact_name;

const EMBEDDED: &str = include_str!("../../../catalog/images.toml");
const KIND: &str = "image";

/// One image the catalog offers: published (`oci`, `url`) and/or built
/// locally from a `recipe`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "RawImage")]
pub struct CatalogImage {
    /// The image's name (also its local name unless renamed).
    pub name: String,
    /// Architecture (`x86_64`).
    pub arch: String,
    /// The kernel the image boots with, by name (`banger kernel list`).
    pub kernel: String,
    /// One line for listings.
    pub description: String,
    /// Whether `vm create` uses this image when none is given.
    pub default: bool,
    /// Where it comes from.
    pub sources: Sources,
}

/// An `[[image]]` table as written; unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    name: String,
    arch: String,
    kernel: String,
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

impl From<RawImage> for CatalogImage {
    fn from(r: RawImage) -> Self {
        CatalogImage {
            name: r.name,
            arch: r.arch,
            kernel: r.kernel,
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

/// The set of pullable images and where relative URLs point.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCatalog {
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default, rename = "image")]
    entries: Vec<CatalogImage>,
}

impl ImageCatalog {
    /// The catalog compiled into this binary.
    pub fn embedded() -> Result<ImageCatalog, CatalogError> {
        ImageCatalog::parse(EMBEDDED)
    }

    /// Parses and checks catalog TOML: `base_url` and `[[image]]` tables.
    pub fn parse(text: &str) -> Result<ImageCatalog, CatalogError> {
        let catalog: ImageCatalog =
            toml::from_str(text).map_err(|e| CatalogError::parse(KIND, e.to_string()))?;
        super::check_entries("image", &catalog.entries, super::recipes::IMAGE_RECIPES)
            .map_err(|why| CatalogError::parse(KIND, why))?;
        for e in &catalog.entries {
            validate_artifact_name("kernel", &e.kernel)
                .map_err(|err| CatalogError::parse(KIND, format!("image {:?}: {err}", e.name)))?;
        }
        Ok(catalog)
    }

    /// The same catalog with relative URLs resolved against `base_url`
    /// (the config override for mirrors and tests).
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> ImageCatalog {
        self.base_url = Some(base_url.into());
        self
    }

    /// Every entry, in file order.
    pub fn entries(&self) -> &[CatalogImage] {
        &self.entries
    }

    /// The entry called `name`; `None` means "not in the catalog, try OCI".
    pub fn find(&self, name: &str) -> Option<&CatalogImage> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The entry marked `default = true`, if any.
    pub fn default_entry(&self) -> Option<&CatalogImage> {
        self.entries.iter().find(|e| e.default)
    }

    /// The absolute URL of an entry's bundle, `None` when it has no URL.
    pub fn url_of(&self, entry: &CatalogImage) -> Result<Option<String>, CatalogError> {
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

impl super::CatalogItem for CatalogImage {
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
    use crate::catalog::kernels::Catalog;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn entry(name: &str, url: &str, kernel: &str, default: bool) -> String {
        format!(
            "[[image]]\nname = {name:?}\narch = \"x86_64\"\nurl = {url:?}\nsha256 = {SHA:?}\nkernel = {kernel:?}\ndescription = \"x\"\ndefault = {default}\n"
        )
    }

    #[test]
    fn embedded_catalog_has_one_default_whose_kernel_is_the_default_kernel() {
        let c = ImageCatalog::embedded().unwrap();
        let d = c.default_entry().unwrap();
        assert_eq!(c.entries().iter().filter(|e| e.default).count(), 1);
        assert!(
            d.sources
                .recipe
                .as_deref()
                .is_some_and(|r| crate::catalog::recipes::IMAGE_RECIPES.contains(&r)),
            "the default image can always be built locally: {d:?}"
        );
        let kernels = Catalog::embedded().unwrap();
        assert_eq!(
            Some(d.kernel.as_str()),
            kernels.default_entry().map(|k| k.name.as_str())
        );
    }

    #[test]
    fn find_answers_none_for_names_to_try_as_oci() {
        let c = ImageCatalog::parse(&entry("deb", "a.tar.zst", "k", false)).unwrap();
        assert_eq!(c.find("deb").map(|e| e.kernel.as_str()), Some("k"));
        assert_eq!(c.find("docker.io/library/debian:12"), None);
        assert_eq!(c.default_entry(), None);
        assert_eq!(c.entries()[0].sources.size, 0, "size is optional");
    }

    #[test]
    fn resolves_relative_urls_against_the_override() {
        let text = format!(
            "base_url = \"https://a.example/x/\"\n{}{}",
            entry("rel", "images/r.tar.zst", "k", true),
            entry("abs", "https://b.example/a.tar.zst", "k", false)
        );
        let c = ImageCatalog::parse(&text).unwrap();
        let rel = c.find("rel").unwrap().clone();
        let abs = c.find("abs").unwrap().clone();
        assert_eq!(
            c.url_of(&rel).unwrap().as_deref(),
            Some("https://a.example/x/images/r.tar.zst")
        );
        let c = c.with_base_url("http://127.0.0.1:1");
        assert_eq!(
            c.url_of(&rel).unwrap().as_deref(),
            Some("http://127.0.0.1:1/images/r.tar.zst")
        );
        assert_eq!(
            c.url_of(&abs).unwrap().as_deref(),
            Some("https://b.example/a.tar.zst")
        );
    }

    #[test]
    fn rejects_bad_catalogs() {
        let two_defaults = format!(
            "{}{}",
            entry("a", "u", "k", true),
            entry("b", "u", "k", true)
        );
        let dup = format!(
            "{}{}",
            entry("a", "u", "k", false),
            entry("a", "u", "k", false)
        );
        let bad_name = entry("../a", "u", "k", false);
        let bad_kernel = entry("a", "u", "../k", false);
        let bad_sha = entry("a", "u", "k", false).replace(SHA, "abc");
        let no_kernel = entry("a", "u", "k", false).replace("kernel = \"k\"\n", "");
        let unknown = format!("{}typo = 1\n", entry("a", "u", "k", false));
        for text in [
            two_defaults,
            dup,
            bad_name,
            bad_kernel,
            bad_sha,
            no_kernel,
            unknown,
        ] {
            assert!(
                matches!(ImageCatalog::parse(&text), Err(CatalogError::Parse { .. })),
                "{text}"
            );
        }
        let c = ImageCatalog::parse(&entry("a", "rel", "k", false)).unwrap();
        assert!(matches!(
            c.url_of(&c.entries()[0]),
            Err(CatalogError::NoBaseUrl { .. })
        ));
    }
}
