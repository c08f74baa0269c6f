//! Writing the catalogs a release pins: the input catalog (the embedded
//! `core/catalog/*.toml`, or none) with each pushed entry's `oci` set to the
//! pushed manifest digest.
//!
//! Catalogs are edited as TOML tables, not through banger's own types, so
//! every field the release does not own (`recipe`, `default`, `description`,
//! fields added later) is copied through unchanged. A pushed entry loses its
//! `url`, `sha256` and `size`: they described another bundle.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use toml::{Table, Value};

/// Fields that describe a URL download, stale once an entry is re-pushed.
const URL_FIELDS: [&str; 3] = ["url", "sha256", "size"];

/// Reads the catalog at `path`, or an empty one when `path` is `None`.
pub fn load(path: Option<&Path>) -> anyhow::Result<Table> {
    let Some(path) = path else {
        return Ok(Table::new());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("Cannot parse the catalog {}", path.display()))
}

/// Sets `oci` on the `[[section]]` entry named `name`, creating it from
/// `new_entry` (which must hold every field a fresh entry needs) when the
/// catalog has none; `always` fields are set on either.
pub fn pin(
    catalog: &mut Table,
    section: &str,
    name: &str,
    oci: &str,
    new_entry: Table,
    always: &[(&str, Value)],
) -> anyhow::Result<()> {
    let entries = catalog
        .entry(section)
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(entries) = entries else {
        bail!("The catalog's `{section}` is not an array of tables ([[{section}]])");
    };
    let found = entries
        .iter_mut()
        .filter_map(Value::as_table_mut)
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name));
    let entry = match found {
        Some(e) => e,
        None => {
            let mut fresh = new_entry;
            fresh.insert("name".into(), Value::String(name.into()));
            entries.push(Value::Table(fresh));
            entries
                .last_mut()
                .and_then(Value::as_table_mut)
                .context("the entry just added is a table")?
        }
    };
    for field in URL_FIELDS {
        entry.remove(field);
    }
    for (key, value) in always {
        entry.insert((*key).into(), value.clone());
    }
    entry.insert("oci".into(), Value::String(oci.into()));
    Ok(())
}

/// Writes `catalog` to `path` under `header` (comment lines), staged in the
/// same directory and renamed into place.
pub fn write(path: &Path, header: &str, catalog: &Table) -> anyhow::Result<()> {
    let body = toml::to_string(catalog).context("Cannot serialise the catalog")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut staged = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("Cannot stage a file in {}", dir.display()))?;
    let text = format!("{header}\n{body}");
    // Catalogs are committed to the repository: world-readable like any
    // source file (the staging file starts out 0600).
    staged
        .write_all(text.as_bytes())
        .and_then(|()| {
            staged
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
        })
        .and_then(|()| staged.as_file().sync_all())
        .with_context(|| format!("Cannot write {}", staged.path().display()))?;
    staged
        .persist(path)
        .with_context(|| format!("Cannot rename the staged catalog to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const PINNED: &str = "reg.example/banger/kernel-k:1@sha256:aaaa";

    fn table(text: &str) -> Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn pins_an_existing_entry_and_keeps_its_other_fields() {
        let mut cat = table(
            "[[kernel]]\nname = \"k\"\nrecipe = \"debian-cloud\"\ndefault = true\n\
             url = \"old.tar.zst\"\nsha256 = \"00\"\nsize = 3\n\
             [[kernel]]\nname = \"other\"\nrecipe = \"x\"\n",
        );
        pin(&mut cat, "kernel", "k", PINNED, Table::new(), &[]).unwrap();
        let entries = cat["kernel"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        let k = entries[0].as_table().unwrap();
        assert_eq!(k["oci"].as_str(), Some(PINNED));
        assert_eq!(k["recipe"].as_str(), Some("debian-cloud"));
        assert_eq!(k["default"].as_bool(), Some(true));
        for stale in URL_FIELDS {
            assert!(!k.contains_key(stale), "{stale} kept");
        }
        assert!(!entries[1].as_table().unwrap().contains_key("oci"));
    }

    #[test]
    fn adds_a_missing_entry_from_the_given_fields() {
        let mut cat = Table::new();
        let fresh = table("arch = \"x86_64\"\ndescription = \"d\"\n");
        let always = [("kernel", Value::String("k".into()))];
        pin(&mut cat, "image", "img", PINNED, fresh, &always).unwrap();
        let text = toml::to_string(&cat).unwrap();
        let back = table(&text);
        let e = back["image"].as_array().unwrap()[0].as_table().unwrap();
        assert_eq!(e["name"].as_str(), Some("img"));
        assert_eq!(e["arch"].as_str(), Some("x86_64"));
        assert_eq!(e["kernel"].as_str(), Some("k"));
        assert_eq!(e["oci"].as_str(), Some(PINNED));
    }

    #[test]
    fn refuses_a_section_that_is_not_an_array() {
        let mut cat = table("kernel = \"oops\"\n");
        let err = pin(&mut cat, "kernel", "k", PINNED, Table::new(), &[]).unwrap_err();
        assert!(err.to_string().contains("[[kernel]]"), "{err}");
    }

    #[test]
    fn write_replaces_the_file_and_leaves_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernels.toml");
        std::fs::write(&path, "old").unwrap();
        let mut cat = Table::new();
        pin(&mut cat, "kernel", "k", PINNED, Table::new(), &[]).unwrap();
        write(&path, "# header", &cat).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# header\n"));
        assert_eq!(table(&text)["kernel"].as_array().unwrap().len(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
