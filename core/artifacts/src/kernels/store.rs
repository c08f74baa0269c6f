//! The kernels root: listing, lookup, removal, staging and publishing.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use super::{KernelError, KernelManifest, LocalKernel, import};

const STAGING_PREFIX: &str = ".staging-";
const MANIFEST: &str = "manifest.toml";

/// The directory holding every local kernel.
#[derive(Debug, Clone)]
pub struct KernelStore {
    root: PathBuf,
}

/// Checks a kernel name: `[a-z0-9][a-z0-9._-]{0,63}` without `..` (the
/// rule images share, see [`banger_api::model::validate_artifact_name`]).
pub fn validate_name(name: &str) -> Result<(), KernelError> {
    banger_api::model::validate_artifact_name("kernel", name)
        .map_err(|_| KernelError::InvalidName(name.to_owned()))
}

impl KernelStore {
    /// A store rooted at `root` (normally `<state_dir>/kernels`); created on
    /// first write.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        KernelStore { root: root.into() }
    }

    /// The kernels root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every local kernel, sorted by name. Directories without a readable
    /// manifest are skipped with a warning.
    pub fn list(&self) -> Result<Vec<KernelManifest>, KernelError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(KernelError::io("read", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(KernelError::io("read", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_err() {
                continue;
            }
            match read_manifest(&entry.path().join(MANIFEST)) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(kernel = %name, error = %e, "skipping kernel"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The local kernel `name`, or `None` if there is none.
    pub fn get(&self, name: &str) -> Result<Option<LocalKernel>, KernelError> {
        validate_name(name)?;
        let dir = self.root.join(name);
        if !dir.join(MANIFEST).exists() {
            return Ok(None);
        }
        let manifest = read_manifest(&dir.join(MANIFEST))?;
        Ok(Some(LocalKernel {
            vmlinux: dir.join("vmlinux"),
            initrd: manifest.has_initrd.then(|| dir.join("initrd")),
            modules: manifest.has_modules.then(|| dir.join("modules")),
            manifest,
            dir,
        }))
    }

    /// Removes the local kernel `name`. It is renamed into a staging dir
    /// first, so a crash mid-delete leaves no half kernel behind.
    pub fn remove(&self, name: &str) -> Result<(), KernelError> {
        validate_name(name)?;
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(KernelError::NotFound(name.to_owned()));
        }
        let trash = self.staging_path(name);
        fs::rename(&dir, &trash).map_err(KernelError::io("rename", &dir))?;
        fs::remove_dir_all(&trash).map_err(KernelError::io("remove", &trash))
    }

    /// Imports `name` from the directory `from` (see `docs/kernels.md` for
    /// how artifacts are discovered). Refuses to replace an existing kernel
    /// unless `force`.
    pub fn import(&self, name: &str, from: &Path, force: bool) -> Result<LocalKernel, KernelError> {
        self.import_as(name, from, force, None)
    }

    /// [`KernelStore::import`], recording `source` (e.g. `build:RECIPE`)
    /// in the manifest instead of `import:<dir>` when given.
    pub fn import_as(
        &self,
        name: &str,
        from: &Path,
        force: bool,
        source: Option<String>,
    ) -> Result<LocalKernel, KernelError> {
        self.import_found(name, force, source, || import::discover(from))
    }

    /// Imports `name` from files given one by one (`image pull --kernel F
    /// --initrd I --modules D`), exactly as [`KernelStore::import`] imports
    /// a directory: a compressed kernel is unpacked, a modules tree gets the
    /// boot modules initrd. Never replaces an existing kernel.
    pub fn import_files(
        &self,
        name: &str,
        files: &import::KernelFiles,
    ) -> Result<LocalKernel, KernelError> {
        self.import_found(name, false, None, || import::from_files(files))
    }

    fn import_found(
        &self,
        name: &str,
        force: bool,
        source: Option<String>,
        find: impl FnOnce() -> Result<import::Found, KernelError>,
    ) -> Result<LocalKernel, KernelError> {
        validate_name(name)?;
        if !force && self.root.join(name).exists() {
            return Err(KernelError::AlreadyExists(name.to_owned()));
        }
        let found = find()?;
        let staging = self.stage(name)?;
        let mut manifest = import::copy_into(&found, staging.path(), name)?;
        if let Some(source) = source {
            manifest.source = source;
        }
        staging.write_manifest(&manifest)?;
        self.publish(staging, name, force)
    }

    /// Removes every leftover staging dir (from an interrupted pull, import
    /// or removal). Returns how many were removed.
    pub fn cleanup_staging(&self) -> Result<usize, KernelError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(KernelError::io("read", &self.root)(e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(KernelError::io("read", &self.root))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
            {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(KernelError::io("remove", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn staging_path(&self, name: &str) -> PathBuf {
        self.root.join(format!(
            "{STAGING_PREFIX}{name}-{:016x}",
            rand::random::<u64>()
        ))
    }

    /// A fresh staging dir for `name`, removed on drop unless published.
    pub(super) fn stage(&self, name: &str) -> Result<Staging, KernelError> {
        fs::create_dir_all(&self.root).map_err(KernelError::io("create", &self.root))?;
        let path = self.staging_path(name);
        fs::create_dir(&path).map_err(KernelError::io("create", &path))?;
        Ok(Staging { path, armed: true })
    }

    /// Moves a complete staging dir to `<root>/<name>`. With `force` an
    /// existing kernel is swapped out atomically and then deleted.
    pub(super) fn publish(
        &self,
        staging: Staging,
        name: &str,
        force: bool,
    ) -> Result<LocalKernel, KernelError> {
        let target = self.root.join(name);
        let rename_err = |e: Errno| KernelError::Io {
            op: "publish",
            path: target.clone(),
            source: io::Error::from(e),
        };
        match renameat2(
            AT_FDCWD,
            staging.path(),
            AT_FDCWD,
            &target,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => staging.disarm(),
            Err(Errno::EEXIST) if !force => {
                return Err(KernelError::AlreadyExists(name.to_owned()));
            }
            Err(Errno::EEXIST) => {
                // The staging path now holds the old kernel; dropping it deletes it.
                renameat2(
                    AT_FDCWD,
                    staging.path(),
                    AT_FDCWD,
                    &target,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .map_err(rename_err)?;
            }
            Err(Errno::EINVAL) => self.publish_without_renameat2(staging, &target, name, force)?,
            Err(e) => return Err(rename_err(e)),
        }
        self.get(name)?
            .ok_or_else(|| KernelError::NotFound(name.to_owned()))
    }

    /// Fallback for filesystems without `renameat2` flags: rename the old
    /// kernel aside into a staging name, then the new one in.
    fn publish_without_renameat2(
        &self,
        staging: Staging,
        target: &Path,
        name: &str,
        force: bool,
    ) -> Result<(), KernelError> {
        if target.exists() {
            if !force {
                return Err(KernelError::AlreadyExists(name.to_owned()));
            }
            let aside = Staging {
                path: self.staging_path(name),
                armed: true,
            };
            fs::rename(target, aside.path()).map_err(KernelError::io("rename", target))?;
            if let Err(e) = fs::rename(staging.path(), target) {
                let _ = fs::rename(aside.path(), target);
                aside.disarm();
                return Err(KernelError::io("publish", target)(e));
            }
        } else {
            fs::rename(staging.path(), target).map_err(KernelError::io("publish", target))?;
        }
        staging.disarm();
        Ok(())
    }
}

/// A staging directory, deleted when dropped unless disarmed by publishing.
#[derive(Debug)]
pub(super) struct Staging {
    path: PathBuf,
    armed: bool,
}

impl Staging {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn disarm(mut self) {
        self.armed = false;
    }

    /// Writes `manifest.toml` into the staging dir (tmp file, then rename).
    pub(super) fn write_manifest(&self, manifest: &KernelManifest) -> Result<(), KernelError> {
        let tmp = self.path.join(".manifest.toml.tmp");
        let text = toml::to_string(manifest)
            .map_err(|e| KernelError::io("write", &tmp)(io::Error::other(e)))?;
        let dest = self.path.join(MANIFEST);
        // A bundle may ship anything under that name: replace it, never follow it.
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(KernelError::io("create", &tmp))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(KernelError::io("write", &tmp))?;
        fs::rename(&tmp, &dest).map_err(KernelError::io("rename", &tmp))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Best effort: a leftover is removed by `cleanup_staging` at next start.
        if self.armed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn read_manifest(path: &Path) -> Result<KernelManifest, KernelError> {
    let text = fs::read_to_string(path)
        .map_err(|e| KernelError::ReadManifest(path.to_path_buf(), Box::new(e)))?;
    toml::from_str(&text).map_err(|e| KernelError::ReadManifest(path.to_path_buf(), Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_names() {
        for ok in [
            "a",
            "firecracker-6.12-x86_64",
            "6.1.0_amd64",
            &"a".repeat(64),
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "../x",
            "a/b",
            "-a",
            ".a",
            "a..b",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(validate_name(bad), Err(KernelError::InvalidName(n)) if n == bad),
                "{bad}"
            );
        }
    }
}
