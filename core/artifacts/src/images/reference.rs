//! Image references (`debian:bookworm`, `ghcr.io/org/img@sha256:…`) and the
//! friendly image names derived from them.

use oci_client::Reference;

use super::ImageError;

/// Parses an image reference the way docker does (`debian` means
/// `docker.io/library/debian:latest`).
pub(crate) fn parse(reference: &str) -> Result<Reference, ImageError> {
    let trimmed = reference.trim();
    if trimmed.is_empty() || trimmed != reference {
        return Err(ImageError::InvalidReference(reference.to_string()));
    }
    reference
        .parse::<Reference>()
        .map_err(|_| ImageError::InvalidReference(reference.to_string()))
}

/// A default image name for `reference`: the last path component of the
/// repository and the tag (or the first 12 hex digits of the digest), joined
/// by `-` and reduced to a lowercase DNS label: `debian:bookworm` becomes
/// `debian-bookworm`, `ghcr.io/org/tools:1.2` becomes `tools-1-2`.
pub fn default_image_name(reference: &str) -> Result<String, ImageError> {
    let parsed = parse(reference)?;
    let repo = parsed.repository();
    let base = repo.rsplit('/').next().unwrap_or(repo);
    let suffix = match (parsed.tag(), parsed.digest()) {
        (Some(tag), _) => tag.to_string(),
        (None, Some(digest)) => {
            let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
            hex.chars().take(12).collect()
        }
        (None, None) => "latest".to_string(),
    };
    let mut name = String::new();
    for c in format!("{base}-{suffix}").chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    name.truncate(63);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        return Err(ImageError::InvalidReference(reference.to_string()));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_reference() {
        let cases = [
            ("debian:bookworm", "debian-bookworm"),
            ("debian", "debian-latest"),
            ("ghcr.io/org/tools:1.2_RC", "tools-1-2-rc"),
            ("127.0.0.1:5000/banger/rootfs:v3", "rootfs-v3"),
            (
                "alpine@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "alpine-0123456789ab",
            ),
        ];
        for (reference, want) in cases {
            assert_eq!(default_image_name(reference).unwrap(), want, "{reference}");
        }
    }

    #[test]
    fn rejects_unparsable_references() {
        for bad in [
            "",
            " debian",
            "UPPER/Case:tag",
            "a:b:c:d",
            "debian@sha256:xyz",
        ] {
            let err = default_image_name(bad).unwrap_err();
            assert!(
                matches!(err, ImageError::InvalidReference(ref r) if r == bad),
                "{bad}: {err}"
            );
        }
    }
}
