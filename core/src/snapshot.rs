//! The snapshot store (`docs/snapshots.md`): `<state dir>/snapshots/NAME/`
//! holds the backend's state files, a copy of each writable disk
//! (`disk-<drive id>`) and `manifest.json` (mode 0600: it carries the
//! guest agent's secret, which a restore needs to reach the agent and give
//! it a new one). A snapshot is written in `.NAME.staging-<pid>` and
//! renamed into place whole; a removal renames it aside first. So a
//! directory without a leading dot is always a complete snapshot.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lifecycle::OpError;
use banger_api::model::{VmName, VmmKind};
pub use banger_api::snapshot::{SNAPSHOT_FORMAT, SnapshotFile, SnapshotView};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// What `manifest.json` holds: the view, and the agent secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Everything listed.
    #[serde(flatten)]
    pub view: SnapshotView,
    /// The guest agent's exec secret at snapshot time, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_secret: Option<String>,
}

/// The snapshots under one state directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
}

/// A snapshot being written; removed when dropped uncommitted.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    target: PathBuf,
    committed: bool,
}

fn io_op(what: impl Into<String>) -> impl FnOnce(io::Error) -> OpError {
    let what = what.into();
    move |e| OpError::Io(what, e)
}

impl SnapshotStore {
    /// The store under `state_dir`.
    pub fn new(state_dir: &Path) -> SnapshotStore {
        SnapshotStore {
            root: state_dir.join("snapshots"),
        }
    }

    /// Where snapshot `name` lives.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Starts writing snapshot `name`: refuses a bad or taken name, clears
    /// staging directories no running daemon owns, and makes a fresh
    /// private staging directory.
    pub fn begin(&self, name: &str) -> Result<Staging, OpError> {
        check_name(name)?;
        let target = self.dir(name);
        if target.exists() {
            return Err(OpError::Invalid(format!(
                "A snapshot named {name:?} already exists; remove it (banger vm snapshot rm {name}) or pick another name"
            )));
        }
        self.sweep();
        let dir = self
            .root
            .join(format!(".{name}.staging-{}", std::process::id()));
        if dir.exists() {
            return Err(OpError::Invalid(format!(
                "Snapshot {name:?} is already being taken; wait for it"
            )));
        }
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_op(format!("creating {}", dir.display())))?;
        Ok(Staging {
            dir,
            target,
            committed: false,
        })
    }

    /// Removes staging and removal leftovers of daemons no longer running.
    fn sweep(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let own = format!("-{}", std::process::id());
        for e in entries.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            let leftover = n.starts_with('.')
                && (n.contains(".staging-") || n.contains(".removing-"))
                && !n.ends_with(&own);
            if leftover {
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    tracing::warn!(path = %e.path().display(), error = %err, "Cannot remove a snapshot leftover");
                }
            }
        }
    }

    /// Every complete snapshot, by name. An unreadable manifest is
    /// skipped with a warning rather than hiding the others.
    pub fn list(&self) -> Result<Vec<SnapshotView>, OpError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(OpError::Io(format!("reading {}", self.root.display()), e)),
        };
        let mut out = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match self.manifest(&name) {
                Ok(m) => out.push(m.view),
                Err(err) => {
                    tracing::warn!(snapshot = %name, error = %crate::lifecycle::render_chain(&err), "Skipping an unreadable snapshot")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Snapshot `name`'s manifest.
    pub fn manifest(&self, name: &str) -> Result<Manifest, OpError> {
        check_name(name)?;
        let path = self.dir(name).join(MANIFEST);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OpError::Invalid(format!(
                    "No snapshot named {name:?}; see `banger vm snapshot list`"
                )));
            }
            Err(e) => return Err(OpError::Io(format!("reading {}", path.display()), e)),
        };
        let mut m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            OpError::Invalid(format!(
                "{} is not a snapshot manifest this banger reads ({e}); remove the snapshot (banger vm snapshot rm {name})",
                path.display()
            ))
        })?;
        m.view.dir = self.dir(name);
        Ok(m)
    }

    /// Snapshot `name`, checked for a restore by `backend`: same format,
    /// same backend, every file there with its recorded size.
    pub fn restorable(&self, name: &str, backend: VmmKind) -> Result<Manifest, OpError> {
        let m = self.manifest(name)?;
        let v = &m.view;
        if v.format != SNAPSHOT_FORMAT {
            return Err(OpError::Invalid(format!(
                "Snapshot {name:?} has format {} (banger {}); this banger restores format {SNAPSHOT_FORMAT}: take the snapshot again",
                v.format, v.banger_version
            )));
        }
        if v.backend != backend {
            return Err(OpError::Invalid(format!(
                "Snapshot {name:?} holds {} state; it cannot be restored under {}: restore it with --vmm {}",
                v.backend.as_str(),
                backend.as_str(),
                v.backend.as_str()
            )));
        }
        for f in &v.files {
            let p = v.dir.join(&f.name);
            let size = fs::metadata(&p).map(|m| m.len()).ok();
            if size != Some(f.size) {
                return Err(OpError::Invalid(format!(
                    "Snapshot {name:?} is damaged: {} is {} where {} bytes were written; remove it (banger vm snapshot rm {name})",
                    p.display(),
                    size.map_or("missing".to_string(), |s| format!("{s} bytes")),
                    f.size
                )));
            }
        }
        Ok(m)
    }

    /// Removes snapshot `name`: renamed aside first, so it is never listed
    /// half removed.
    pub fn remove(&self, name: &str) -> Result<(), OpError> {
        self.manifest(name)?;
        let aside = self
            .root
            .join(format!(".{name}.removing-{}", std::process::id()));
        fs::rename(self.dir(name), &aside).map_err(io_op(format!("removing snapshot {name}")))?;
        fs::remove_dir_all(&aside).map_err(io_op(format!("removing {}", aside.display())))
    }
}

impl Staging {
    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Records every file written with its size, writes the manifest
    /// (0600) and renames the snapshot into place.
    pub fn commit(mut self, mut manifest: Manifest) -> Result<SnapshotView, OpError> {
        let mut files = Vec::new();
        let entries =
            fs::read_dir(&self.dir).map_err(io_op(format!("reading {}", self.dir.display())))?;
        for e in entries.filter_map(Result::ok) {
            let size = e
                .metadata()
                .map_err(io_op(format!("reading {}", e.path().display())))?
                .len();
            files.push(SnapshotFile {
                name: e.file_name().to_string_lossy().into_owned(),
                size,
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        manifest.view.files = files;
        manifest.view.dir = self.target.clone();
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| OpError::Io("encoding the snapshot manifest".into(), e.into()))?;
        let path = self.dir.join(MANIFEST);
        banger_api::fsutil::write_atomic(&path, &bytes, 0o600)
            .map_err(io_op(format!("writing {}", path.display())))?;
        if self.target.exists() {
            return Err(OpError::Invalid(format!(
                "A snapshot named {:?} appeared meanwhile; pick another name",
                manifest.view.name
            )));
        }
        fs::rename(&self.dir, &self.target).map_err(io_op(format!(
            "renaming {} to {}",
            self.dir.display(),
            self.target.display()
        )))?;
        self.committed = true;
        Ok(manifest.view)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A snapshot name follows a VM name's rules (it becomes a directory name).
fn check_name(name: &str) -> Result<(), OpError> {
    VmName::parse(name).map(drop).map_err(|_| {
        OpError::Invalid(format!(
            "Invalid snapshot name {name:?}: use 1-63 characters of a-z, 0-9 and '-', not starting with '-'"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::machine::MachineSpec;

    fn manifest(name: &str, backend: VmmKind) -> Manifest {
        let spec = banger_api::model::VmSpec {
            vcpus: 1,
            memory_mib: 128,
            disk_size: banger_api::model::ByteSize(1 << 20),
            kernel: "/k".into(),
            initrd: None,
            rootfs_source: "/r".into(),
            extra_boot_args: None,
            vmm: backend,
        };
        Manifest {
            view: SnapshotView {
                name: name.into(),
                format: SNAPSHOT_FORMAT,
                banger_version: "test".into(),
                backend,
                source_vm: "src".into(),
                spec,
                machine: MachineSpec {
                    kernel: "/k".into(),
                    initrd: None,
                    boot_args: String::new(),
                    vcpus: 1,
                    memory_mib: 128,
                    drives: vec![],
                    nics: vec![],
                    vsock: None,
                    serial_log: "/s".into(),
                    pci_devices: vec![],
                },
                caps: vec![],
                guest: None,
                files: vec![],
                created_at: 1,
                dir: PathBuf::new(),
            },
            agent_secret: Some("s3cret".into()),
        }
    }

    #[test]
    fn a_committed_snapshot_is_listed_with_its_files_and_a_private_manifest() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(state.path());
        let staging = store.begin("s1").unwrap();
        fs::write(staging.path().join("disk-root"), vec![7u8; 1000]).unwrap();
        fs::write(staging.path().join("qemu.migration"), b"state").unwrap();
        // Not listed while staged.
        assert!(store.list().unwrap().is_empty());
        let view = staging.commit(manifest("s1", VmmKind::Qemu)).unwrap();
        let files: Vec<(&str, u64)> = view
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.size))
            .collect();
        assert_eq!(files, [("disk-root", 1000), ("qemu.migration", 5)]);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "s1");
        assert_eq!(listed[0].dir, store.dir("s1"));
        let mode = fs::metadata(store.dir("s1").join(MANIFEST))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the manifest holds the agent secret");
        assert_eq!(
            store.manifest("s1").unwrap().agent_secret.as_deref(),
            Some("s3cret")
        );
        // The name is taken now.
        let err = store.begin("s1").unwrap_err().to_string();
        assert!(
            err.contains("already exists") && err.contains("snapshot rm s1"),
            "{err}"
        );
    }

    #[test]
    fn an_abandoned_staging_leaves_nothing_and_bad_names_are_refused() {
        let state = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(state.path());
        {
            let staging = store.begin("gone").unwrap();
            fs::write(staging.path().join("x"), b"x").unwrap();
        }
        assert_eq!(
            fs::read_dir(state.path().join("snapshots"))
                .unwrap()
                .count(),
            0
        );
        for bad in ["", "Up", "../x", "-a", ".hidden"] {
            let err = store.begin(bad).unwrap_err().to_string();
            assert!(err.contains("Invalid snapshot name"), "{bad}: {err}");
        }
        // A leftover of another daemon is swept by the next snapshot.
        let stale = state.path().join("snapshots/.old.staging-1");
        fs::create_dir_all(&stale).unwrap();
        drop(store.begin("next").unwrap());
        assert!(!stale.exists());
    }

    #[test]
    fn a_restore_is_refused_on_another_backend_format_or_a_damaged_file() {
        let state = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(state.path());
        let staging = store.begin("s").unwrap();
        fs::write(staging.path().join("disk-root"), vec![1u8; 10]).unwrap();
        staging.commit(manifest("s", VmmKind::Qemu)).unwrap();
        assert!(store.restorable("s", VmmKind::Qemu).is_ok());
        let err = store
            .restorable("s", VmmKind::Firecracker)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds qemu state") && err.contains("--vmm qemu"),
            "{err}"
        );

        fs::write(store.dir("s").join("disk-root"), b"short").unwrap();
        let err = store
            .restorable("s", VmmKind::Qemu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged") && err.contains("5 bytes"), "{err}");

        let path = store.dir("s").join(MANIFEST);
        let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        m["format"] = serde_json::json!(SNAPSHOT_FORMAT + 1);
        fs::write(&path, m.to_string()).unwrap();
        let err = store
            .restorable("s", VmmKind::Qemu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("take the snapshot again"), "{err}");

        store.remove("s").unwrap();
        assert!(store.list().unwrap().is_empty());
        let err = store.remove("s").unwrap_err().to_string();
        assert!(err.contains("No snapshot named"), "{err}");
    }
}
