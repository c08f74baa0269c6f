//! The daemon's SQLite database: one file, WAL journal, schema migrations
//! keyed by `PRAGMA user_version`.
//!
//! Scalar fields of a [`VmRecord`] are real columns so the database can be
//! inspected and queried with `sqlite3`; nested structures (capabilities,
//! machine spec, guest config) are JSON text.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, Row, params};

mod capability_tables;
mod images;

use banger_api::model::{Failure, VmId, VmName, VmRecord, VmSpec, VmState, VmmKind, VmmProcess};

/// Schema migrations, in order. Step `i` brings the database to
/// `user_version = i + 1`. Never edit a released step; append a new one.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE vms (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    vcpus           INTEGER NOT NULL,
    memory_mib      INTEGER NOT NULL,
    disk_size       INTEGER NOT NULL,
    kernel          TEXT NOT NULL,
    initrd          TEXT,
    rootfs_source   TEXT NOT NULL,
    extra_boot_args TEXT,
    vmm             TEXT NOT NULL,
    pid             INTEGER,
    pid_start_time  INTEGER,
    api_socket      TEXT,
    failed_stage    TEXT,
    failure         TEXT,
    failed_at       INTEGER,
    booted_once     INTEGER NOT NULL CHECK (booted_once IN (0, 1)),
    caps            TEXT NOT NULL,
    prepared        TEXT NOT NULL,
    machine         TEXT,
    guest           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX vms_created ON vms (created_at, name);
",
    r"
CREATE TABLE images (
    name       TEXT PRIMARY KEY NOT NULL,
    rootfs     TEXT NOT NULL,
    record     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
",
    // The `network` capability's table from before capabilities kept their
    // own (it now creates it itself, `IF NOT EXISTS`, through
    // `Store::capability_tables`). Kept because released steps are history.
    r"
CREATE TABLE leases (
    vm_id      TEXT PRIMARY KEY NOT NULL,
    ip         TEXT NOT NULL UNIQUE,
    mac        TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
",
    // Each capability's own schema version (`Store::capability_tables`).
    r"
CREATE TABLE cap_schema (
    owner   TEXT PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL
);
",
    // VMs whose delete has begun: a daemon killed mid-delete finishes it on
    // restart (reconcile) instead of leaving a half-deleted VM.
    r"
CREATE TABLE vm_deleting (
    id TEXT PRIMARY KEY NOT NULL
);
",
    // The stage timings of each VM's last start (JSON, `StartTimings`), for
    // `vm show`; NULL until the VM is first started.
    r"
ALTER TABLE vms ADD COLUMN last_start TEXT;
",
    // The warm pool (`docs/warm-pool.md`): VMs the daemon booted ahead of
    // a `vm create`/`vm run`, each with the image name it was made for.
    // A VM listed here is the daemon's: not found by name, not listed.
    r"
CREATE TABLE vm_pool (
    id    TEXT PRIMARY KEY NOT NULL,
    image TEXT
);
",
];

/// How long a connection waits for another writer before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const COLUMNS: &str = "id, name, state, vcpus, memory_mib, disk_size, kernel, initrd, \
    rootfs_source, extra_boot_args, vmm, pid, pid_start_time, api_socket, failed_stage, \
    failure, failed_at, booted_once, caps, prepared, machine, guest, created_at, updated_at, \
    last_start";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The statement inserting one VM row ([`EncodedVm::execute`]).
fn insert_sql() -> String {
    format!(
        "INSERT INTO vms ({COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
          ?19, ?20, ?21, ?22, ?23, ?24, ?25)"
    )
}

/// A database operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("Cannot open database {}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A connection setting could not be applied.
    #[error("Cannot set PRAGMA {pragma} on the database")]
    Configure {
        /// The pragma.
        pragma: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The database was written by a newer banger.
    #[error(
        "Database {} has schema version {found}, but this banger only knows up to {supported}; upgrade banger (or move the file away to start afresh)",
        path.display()
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// The newest version this binary can migrate to.
        supported: i64,
    },
    /// A schema migration step failed; the database keeps the previous version.
    #[error("Cannot migrate the database to schema version {version}")]
    Migrate {
        /// The version the failed step would have produced.
        version: i64,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// Another VM already has this name.
    #[error("A VM named \"{0}\" already exists; pick another name or delete that VM first")]
    NameTaken(VmName),
    /// Another VM already has this id.
    #[error("A VM with id {0} already exists")]
    IdTaken(VmId),
    /// No VM with this id.
    #[error("No VM with id {0}")]
    NotFound(VmId),
    /// A field of a VM could not be turned into a column value.
    #[error("Cannot store column {column} of VM {id}")]
    Encode {
        /// The VM.
        id: VmId,
        /// The column.
        column: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// A stored row could not be turned back into a VM.
    #[error("Cannot read column {column} of VM {id}")]
    Decode {
        /// The VM id as stored.
        id: String,
        /// The column.
        column: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// Inserting a VM failed.
    #[error("Cannot insert VM {id}")]
    Insert {
        /// The VM.
        id: VmId,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// Updating a VM failed.
    #[error("Cannot update VM {id}")]
    Update {
        /// The VM.
        id: VmId,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// Deleting a VM failed.
    #[error("Cannot delete VM {id}")]
    Delete {
        /// The VM.
        id: VmId,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// Reading VMs failed.
    #[error("Cannot read VMs from the database")]
    Read(#[source] rusqlite::Error),
    /// Another image already has this name.
    #[error("An image named \"{0}\" already exists; pick another --name or delete it first")]
    ImageNameTaken(String),
    /// A capability's tables were written by a newer banger.
    #[error(
        "The tables of capability \"{owner}\" have schema version {found}, but this banger only knows up to {supported}; upgrade banger"
    )]
    CapabilityTooNew {
        /// The capability.
        owner: String,
        /// Its version in `cap_schema`.
        found: i64,
        /// The newest version this binary can migrate to.
        supported: i64,
    },
    /// A step of a capability's migrations failed; its tables keep the
    /// previous version.
    #[error("Cannot migrate the tables of capability \"{owner}\" to version {version}")]
    CapabilityMigrate {
        /// The capability.
        owner: String,
        /// The version the failed step would have produced.
        version: i64,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A transaction could not begin or commit.
    #[error("Cannot begin or commit a database transaction")]
    Transaction(#[source] rusqlite::Error),
    /// An image operation failed.
    #[error("Cannot {op} image {name}")]
    Image {
        /// What was being done (`insert`, `read`, `delete`).
        op: &'static str,
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: BoxError,
    },
}

/// The daemon's database. One connection behind a mutex: SQLite serialises
/// writers anyway, and the daemon's queries are tiny.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`. The
    /// parent directory must exist (see `Paths::create_all`).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        configure(&conn)?;
        migrate(&mut conn, path, MIGRATIONS)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Records a new VM. Fails with [`StoreError::NameTaken`] if the name is in use.
    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let row = EncodedVm::new(vm)?;
        let res = row.execute(&self.lock(), &insert_sql());
        match res {
            Ok(_) => Ok(()),
            Err(e) => Err(match constraint_column(&e) {
                Some("vms.name") => StoreError::NameTaken(vm.name.clone()),
                Some("vms.id") => StoreError::IdTaken(vm.id.clone()),
                _ => StoreError::Insert {
                    id: vm.id.clone(),
                    source: e,
                },
            }),
        }
    }

    /// Records a new VM of the warm pool, made for image `image` (`None`:
    /// the default), in one transaction with its pool entry.
    pub fn insert_pooled_vm(&self, vm: &VmRecord, image: Option<&str>) -> Result<(), StoreError> {
        let row = EncodedVm::new(vm)?;
        let mut conn = self.lock();
        let done = (|| {
            let tx = conn.transaction()?;
            row.execute(&tx, &insert_sql())?;
            tx.execute(
                "INSERT INTO vm_pool (id, image) VALUES (?1, ?2)",
                params![vm.id.as_str(), image],
            )?;
            tx.commit()
        })();
        done.map_err(|e| match constraint_column(&e) {
            Some("vms.name") => StoreError::NameTaken(vm.name.clone()),
            Some("vms.id") => StoreError::IdTaken(vm.id.clone()),
            _ => StoreError::Insert {
                id: vm.id.clone(),
                source: e,
            },
        })
    }

    /// The warm pool's VMs: each id with the image name it was made for.
    pub fn pooled(&self) -> Result<Vec<(VmId, Option<String>)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT id, image FROM vm_pool ORDER BY rowid")
            .map_err(StoreError::Read)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((VmId::from_stored(r.get(0)?), r.get::<_, Option<String>>(1)?))
            })
            .map_err(StoreError::Read)?;
        rows.collect::<Result<_, _>>().map_err(StoreError::Read)
    }

    /// Takes VM `id` out of the warm pool: from now on it is the user's.
    /// Returns whether it was in the pool.
    pub fn unpool(&self, id: &VmId) -> Result<bool, StoreError> {
        self.lock()
            .execute("DELETE FROM vm_pool WHERE id = ?1", [id.as_str()])
            .map(|n| n > 0)
            .map_err(|source| StoreError::Update {
                id: id.clone(),
                source,
            })
    }

    /// Replaces every field of an existing VM. Fails with
    /// [`StoreError::NotFound`] if there is no VM with that id.
    pub fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let row = EncodedVm::new(vm)?;
        let sql = "UPDATE vms SET name = ?2, state = ?3, vcpus = ?4, memory_mib = ?5, \
            disk_size = ?6, kernel = ?7, initrd = ?8, rootfs_source = ?9, extra_boot_args = ?10, \
            vmm = ?11, pid = ?12, pid_start_time = ?13, api_socket = ?14, failed_stage = ?15, \
            failure = ?16, failed_at = ?17, booted_once = ?18, caps = ?19, prepared = ?20, \
            machine = ?21, guest = ?22, created_at = ?23, updated_at = ?24, last_start = ?25 \
            WHERE id = ?1";
        match row.execute(&self.lock(), sql) {
            Ok(0) => Err(StoreError::NotFound(vm.id.clone())),
            Ok(_) => Ok(()),
            Err(e) => Err(match constraint_column(&e) {
                Some("vms.name") => StoreError::NameTaken(vm.name.clone()),
                _ => StoreError::Update {
                    id: vm.id.clone(),
                    source: e,
                },
            }),
        }
    }

    /// The VM with this id, if any.
    pub fn get_vm(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        self.query_one("id", id.as_str())
    }

    /// The VM with this name, if any and not in the warm pool (a pooled
    /// VM is the daemon's until a create takes it).
    pub fn find_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        Ok(self
            .query_one("name", name)?
            .filter(|vm| !self.is_pooled(&vm.id).unwrap_or(false)))
    }

    /// Whether VM `id` is in the warm pool.
    pub fn is_pooled(&self, id: &VmId) -> Result<bool, StoreError> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM vm_pool WHERE id = ?1",
                [id.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(StoreError::Read)
    }

    /// Every VM, oldest first (ties broken by name).
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM vms ORDER BY created_at, name"
            ))
            .map_err(StoreError::Read)?;
        let mut rows = stmt.query([]).map_err(StoreError::Read)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(StoreError::Read)? {
            out.push(decode_vm(row)?);
        }
        Ok(out)
    }

    /// Removes a VM's row (and its deleting mark). Returns whether it existed.
    pub fn delete_vm(&self, id: &VmId) -> Result<bool, StoreError> {
        let conn = self.lock();
        let err = |source| StoreError::Delete {
            id: id.clone(),
            source,
        };
        let n = conn
            .execute("DELETE FROM vms WHERE id = ?1", [id.as_str()])
            .map_err(err)?;
        conn.execute("DELETE FROM vm_deleting WHERE id = ?1", [id.as_str()])
            .map_err(err)?;
        conn.execute("DELETE FROM vm_pool WHERE id = ?1", [id.as_str()])
            .map_err(err)?;
        Ok(n > 0)
    }

    /// Marks (or unmarks) a VM as being deleted, so a delete interrupted by
    /// a crash is finished when the daemon starts again.
    pub fn set_deleting(&self, id: &VmId, deleting: bool) -> Result<(), StoreError> {
        let sql = if deleting {
            "INSERT OR IGNORE INTO vm_deleting (id) VALUES (?1)"
        } else {
            "DELETE FROM vm_deleting WHERE id = ?1"
        };
        self.lock()
            .execute(sql, [id.as_str()])
            .map_err(|source| StoreError::Update {
                id: id.clone(),
                source,
            })?;
        Ok(())
    }

    /// Whether a delete of the VM has begun and not finished.
    pub fn is_deleting(&self, id: &VmId) -> Result<bool, StoreError> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM vm_deleting WHERE id = ?1",
                [id.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(StoreError::Read)
    }

    fn query_one(&self, column: &str, value: &str) -> Result<Option<VmRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM vms WHERE {column} = ?1"))
            .map_err(StoreError::Read)?;
        let mut rows = stmt.query([value]).map_err(StoreError::Read)?;
        match rows.next().map_err(StoreError::Read)? {
            Some(row) => decode_vm(row).map(Some),
            None => Ok(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection in a bad
        // state: an open transaction is rolled back when it is dropped.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Applies the per-connection settings. WAL lets readers proceed during a
/// write; NORMAL sync is durable enough in WAL mode and much faster.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    let cfg = |pragma: &'static str| {
        move |e: rusqlite::Error| StoreError::Configure {
            pragma,
            source: Box::new(e),
        }
    };
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(cfg("busy_timeout"))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(cfg("journal_mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Configure {
            pragma: "journal_mode",
            source: format!("the database stayed in {mode:?} mode").into(),
        });
    }
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(cfg("foreign_keys"))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(cfg("synchronous"))?;
    Ok(())
}

/// Brings the schema up to `steps.len()`, one transaction per step so a
/// failing step leaves the database at the previous version.
fn migrate(conn: &mut Connection, path: &Path, steps: &[&str]) -> Result<(), StoreError> {
    let supported = steps.len() as i64;
    let current: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(StoreError::Read)?;
    if current > supported {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: current,
            supported,
        });
    }
    for (i, sql) in steps.iter().enumerate().skip(current.max(0) as usize) {
        let version = i as i64 + 1;
        let err = |source| StoreError::Migrate { version, source };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

/// The column a UNIQUE/PRIMARY KEY violation is about (`vms.name`), if `e` is one.
fn constraint_column(e: &rusqlite::Error) -> Option<&str> {
    match e {
        rusqlite::Error::SqliteFailure(f, Some(msg))
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            msg.strip_prefix("UNIQUE constraint failed: ")
        }
        _ => None,
    }
}

/// A [`VmRecord`] turned into column values.
struct EncodedVm<'a> {
    vm: &'a VmRecord,
    disk_size: i64,
    kernel: &'a str,
    initrd: Option<&'a str>,
    rootfs_source: &'a str,
    vmm: &'static str,
    pid: Option<i64>,
    pid_start_time: Option<i64>,
    api_socket: Option<&'a str>,
    failed_at: Option<i64>,
    caps: String,
    prepared: String,
    machine: Option<String>,
    guest: Option<String>,
    created_at: i64,
    updated_at: i64,
    last_start: Option<String>,
}

impl<'a> EncodedVm<'a> {
    fn new(vm: &'a VmRecord) -> Result<Self, StoreError> {
        let enc = |column: &'static str| {
            move |source: BoxError| StoreError::Encode {
                id: vm.id.clone(),
                column,
                source,
            }
        };
        let path = |p: &'a Path, column: &'static str| -> Result<&'a str, StoreError> {
            p.to_str()
                .ok_or_else(|| enc(column)(format!("{} is not UTF-8", p.display()).into()))
        };
        let int = |n: u64, column: &'static str| -> Result<i64, StoreError> {
            i64::try_from(n).map_err(|e| enc(column)(Box::new(e)))
        };
        let json = |v: &dyn erased::Json, column: &'static str| -> Result<String, StoreError> {
            v.to_json().map_err(|e| enc(column)(Box::new(e)))
        };
        let spec = &vm.spec;
        Ok(EncodedVm {
            vm,
            disk_size: int(spec.disk_size.0, "disk_size")?,
            kernel: path(&spec.kernel, "kernel")?,
            initrd: spec
                .initrd
                .as_deref()
                .map(|p| path(p, "initrd"))
                .transpose()?,
            rootfs_source: path(&spec.rootfs_source, "rootfs_source")?,
            vmm: spec.vmm.as_str(),
            pid: vm.vmm.as_ref().map(|p| i64::from(p.pid)),
            pid_start_time: vm
                .vmm
                .as_ref()
                .map(|p| int(p.start_time, "pid_start_time"))
                .transpose()?,
            api_socket: vm
                .vmm
                .as_ref()
                .map(|p| path(&p.api_socket, "api_socket"))
                .transpose()?,
            failed_at: vm
                .last_error
                .as_ref()
                .map(|f| int(f.at, "failed_at"))
                .transpose()?,
            caps: json(&vm.caps, "caps")?,
            prepared: json(&vm.prepared, "prepared")?,
            machine: vm
                .machine
                .as_ref()
                .map(|m| json(m, "machine"))
                .transpose()?,
            guest: vm.guest.as_ref().map(|g| json(g, "guest")).transpose()?,
            created_at: int(vm.created_at, "created_at")?,
            updated_at: int(vm.updated_at, "updated_at")?,
            last_start: vm
                .last_start
                .as_ref()
                .map(|t| json(t, "last_start"))
                .transpose()?,
        })
    }

    /// Runs `sql` with the row as parameters `?1..?25`, in `COLUMNS` order.
    /// The statement is kept prepared on the connection: parsing the
    /// 25-column insert or update was 2% of the daemon's CPU per create.
    fn execute(&self, conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
        let vm = self.vm;
        conn.prepare_cached(sql)?.execute(params![
            vm.id.as_str(),
            vm.name.as_str(),
            vm.state.as_str(),
            vm.spec.vcpus,
            vm.spec.memory_mib,
            self.disk_size,
            self.kernel,
            self.initrd,
            self.rootfs_source,
            vm.spec.extra_boot_args.as_deref(),
            self.vmm,
            self.pid,
            self.pid_start_time,
            self.api_socket,
            vm.last_error.as_ref().map(|f| f.stage.as_str()),
            vm.last_error.as_ref().map(|f| f.cause.as_str()),
            self.failed_at,
            vm.booted_once,
            self.caps,
            self.prepared,
            self.machine,
            self.guest,
            self.created_at,
            self.updated_at,
            self.last_start,
        ])
    }
}

mod erased {
    //! Object-safe JSON encoding so one closure serves every JSON column.
    pub(super) trait Json {
        fn to_json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<String> {
            serde_json::to_string(self)
        }
    }
}

/// Reads one row (selected with `COLUMNS`) back into a [`VmRecord`]; every
/// failure names the VM and the column.
fn decode_vm(row: &Row<'_>) -> Result<VmRecord, StoreError> {
    let id: String = row.get(0).map_err(StoreError::Read)?;
    let dec = |column: &'static str| {
        let id = id.clone();
        move |source: BoxError| StoreError::Decode { id, column, source }
    };
    let get = |idx: usize, column: &'static str| -> Result<rusqlite::types::Value, StoreError> {
        row.get(idx).map_err(|e| dec(column)(Box::new(e)))
    };
    let text = |idx, column| -> Result<Option<String>, StoreError> {
        match get(idx, column)? {
            rusqlite::types::Value::Null => Ok(None),
            rusqlite::types::Value::Text(s) => Ok(Some(s)),
            other => Err(dec(column)(
                format!("expected text, found {:?}", other.data_type()).into(),
            )),
        }
    };
    let int = |idx, column| -> Result<Option<i64>, StoreError> {
        match get(idx, column)? {
            rusqlite::types::Value::Null => Ok(None),
            rusqlite::types::Value::Integer(n) => Ok(Some(n)),
            other => Err(dec(column)(
                format!("expected an integer, found {:?}", other.data_type()).into(),
            )),
        }
    };
    fn req<T>(v: Option<T>, id: &str, column: &'static str) -> Result<T, StoreError> {
        v.ok_or_else(|| StoreError::Decode {
            id: id.to_string(),
            column,
            source: "unexpected NULL".into(),
        })
    }
    let req_text = |idx, column| req(text(idx, column)?, &id, column);
    let unsigned = |idx, column| -> Result<Option<u64>, StoreError> {
        int(idx, column)?
            .map(|n| u64::try_from(n).map_err(|e| dec(column)(Box::new(e))))
            .transpose()
    };
    let req_u64 = |idx, column| req(unsigned(idx, column)?, &id, column);
    let req_u32 = |idx, column| -> Result<u32, StoreError> {
        u32::try_from(req_u64(idx, column)?).map_err(|e| dec(column)(Box::new(e)))
    };
    fn json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, BoxError> {
        serde_json::from_str(s).map_err(|e| Box::new(e) as BoxError)
    }

    let name = VmName::parse(&req_text(1, "name")?).map_err(|e| dec("name")(Box::new(e)))?;
    let state: VmState = req_text(2, "state")?
        .parse()
        .map_err(|e| dec("state")(Box::new(e)))?;
    // Backend names are their serde names, so new backends decode without code here.
    let vmm_kind: VmmKind = serde_json::from_value(serde_json::Value::String(req_text(10, "vmm")?))
        .map_err(|e| dec("vmm")(Box::new(e)))?;
    let spec = VmSpec {
        vcpus: req_u32(3, "vcpus")?,
        memory_mib: req_u32(4, "memory_mib")?,
        disk_size: banger_api::model::ByteSize(req_u64(5, "disk_size")?),
        kernel: req_text(6, "kernel")?.into(),
        initrd: text(7, "initrd")?.map(PathBuf::from),
        rootfs_source: req_text(8, "rootfs_source")?.into(),
        extra_boot_args: text(9, "extra_boot_args")?,
        vmm: vmm_kind,
    };
    let pid = unsigned(11, "pid")?;
    let start_time = unsigned(12, "pid_start_time")?;
    let api_socket = text(13, "api_socket")?;
    let vmm = match (pid, start_time, api_socket) {
        (None, None, None) => None,
        (Some(pid), Some(start_time), Some(sock)) => Some(VmmProcess {
            pid: u32::try_from(pid).map_err(|e| dec("pid")(Box::new(e)))?,
            start_time,
            api_socket: sock.into(),
        }),
        _ => {
            return Err(dec("pid")(
                "pid, pid_start_time and api_socket must be all set or all NULL".into(),
            ));
        }
    };
    let last_error = match (
        text(14, "failed_stage")?,
        text(15, "failure")?,
        unsigned(16, "failed_at")?,
    ) {
        (None, None, None) => None,
        (Some(stage), Some(cause), Some(at)) => Some(Failure { stage, cause, at }),
        _ => {
            return Err(dec("failed_stage")(
                "failed_stage, failure and failed_at must be all set or all NULL".into(),
            ));
        }
    };
    let booted_once = match req(int(17, "booted_once")?, &id, "booted_once")? {
        0 => false,
        1 => true,
        n => {
            return Err(dec("booted_once")(
                format!("expected 0 or 1, found {n}").into(),
            ));
        }
    };
    Ok(VmRecord {
        id: VmId::from_stored(id.clone()),
        name,
        state,
        spec,
        caps: json(&req_text(18, "caps")?).map_err(dec("caps"))?,
        prepared: json(&req_text(19, "prepared")?).map_err(dec("prepared"))?,
        vmm,
        last_error,
        machine: text(20, "machine")?
            .map(|s| json(&s))
            .transpose()
            .map_err(dec("machine"))?,
        guest: text(21, "guest")?
            .map(|s| json(&s))
            .transpose()
            .map_err(dec("guest"))?,
        booted_once,
        created_at: req_u64(22, "created_at")?,
        updated_at: req_u64(23, "updated_at")?,
        last_start: text(24, "last_start")?
            .map(|s| json(&s))
            .transpose()
            .map_err(dec("last_start"))?,
    })
}

// The daemon shares one `Store` between tasks through an `Arc`.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Store>();
};

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use banger_api::guest::{GuestConfig, GuestFile, GuestMount, GuestNetwork};
    use banger_api::machine::{Drive, DriveRole, MachineSpec, Nic, Vsock};
    use banger_api::model::{ByteSize, CapOptions, EnabledCap};

    fn minimal(id: &str, name: &str, created_at: u64) -> VmRecord {
        VmRecord {
            id: VmId::from_stored(id.to_string()),
            name: VmName::parse(name).unwrap(),
            state: VmState::Created,
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 512,
                disk_size: ByteSize(8 << 30),
                kernel: "/k/vmlinux".into(),
                initrd: None,
                rootfs_source: "/images/debian.ext4".into(),
                extra_boot_args: None,
                vmm: VmmKind::Firecracker,
            },
            caps: vec![],
            prepared: vec![],
            vmm: None,
            last_error: None,
            machine: None,
            guest: None,
            booted_once: false,
            created_at,
            updated_at: created_at,
            last_start: None,
        }
    }

    fn full(id: &str, name: &str) -> VmRecord {
        let mut opts = CapOptions::new();
        opts.insert("host".into(), "/src".into());
        opts.insert("guest".into(), "/mnt/src".into());
        let mut guest = GuestConfig::new(name);
        guest.mounts.push(GuestMount {
            drive_id: "work".into(),
            mount_point: "/root".into(),
            fstype: "ext4".into(),
            read_only: false,
        });
        guest.files.push(GuestFile {
            path: "/etc/motd".into(),
            contents: vec![0, 1, 2, 255],
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        guest.network.push(GuestNetwork {
            nic_id: "eth0".into(),
            address: "172.30.0.5/24".into(),
            gateway: Some("172.30.0.1".into()),
            mtu: Some(1500),
            nameservers: vec!["172.30.0.1".into()],
        });
        guest.authorized_keys.push("ssh-ed25519 AAAA test".into());
        guest.env = BTreeMap::from([("LANG".to_string(), "C.UTF-8".to_string())]);
        guest.commands.push(vec!["true".into()]);
        VmRecord {
            id: VmId::from_stored(id.to_string()),
            name: VmName::parse(name).unwrap(),
            state: VmState::Error,
            spec: VmSpec {
                vcpus: 4,
                memory_mib: 2048,
                disk_size: ByteSize(20 << 30),
                kernel: "/k/vmlinux-6.1".into(),
                initrd: Some("/k/initrd.img".into()),
                rootfs_source: "/images/alpine.ext4".into(),
                extra_boot_args: Some("quiet loglevel=3".into()),
                vmm: VmmKind::Firecracker,
            },
            caps: vec![
                EnabledCap {
                    name: "work-disk".into(),
                    options: CapOptions::new(),
                },
                EnabledCap {
                    name: "shared-mount".into(),
                    options: opts,
                },
            ],
            prepared: vec!["work-disk".into(), "shared-mount".into()],
            vmm: Some(VmmProcess {
                pid: 4242,
                start_time: 987_654_321,
                api_socket: "/run/banger/vms/x.sock".into(),
            }),
            last_error: Some(Failure {
                stage: "prepare_host:work-disk".into(),
                cause: "Cannot create disk: No space left on device".into(),
                at: 1_700_000_123,
            }),
            machine: Some(MachineSpec {
                kernel: "/k/vmlinux-6.1".into(),
                initrd: Some("/k/initrd.img".into()),
                boot_args: "console=ttyS0".into(),
                vcpus: 4,
                memory_mib: 2048,
                drives: vec![Drive {
                    id: "root".into(),
                    path: "/vms/x/root.ext4".into(),
                    read_only: false,
                    role: DriveRole::Root,
                }],
                nics: vec![Nic {
                    id: "eth0".into(),
                    tap: "bgtap0".into(),
                    mac: "02:00:00:00:00:05".into(),
                }],
                vsock: Some(Vsock {
                    guest_cid: 7,
                    uds_path: "/run/banger/vms/x.vsock".into(),
                }),
                serial_log: "/vms/x/serial.log".into(),
                pci_devices: Vec::new(),
            }),
            guest: Some(guest),
            booted_once: true,
            created_at: 1_700_000_000,
            updated_at: 1_700_000_200,
            last_start: Some(banger_api::model::StartTimings {
                at: 1_700_000_100,
                ok: false,
                total_ms: 1500,
                stages: vec![
                    banger_api::model::StageTiming {
                        stage: "prepare_host:work-disk".into(),
                        ms: 12,
                    },
                    banger_api::model::StageTiming {
                        stage: "rollback".into(),
                        ms: 3,
                    },
                ],
            }),
        }
    }

    fn open_temp() -> (tempfile::TempDir, PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let store = Store::open(&path).unwrap();
        (dir, path, store)
    }

    #[test]
    fn round_trips_every_field_set_and_unset() {
        let (_dir, path, store) = open_temp();
        let a = full("00000000000000aa", "full-vm");
        let b = minimal("00000000000000bb", "bare-vm", 5);
        store.insert_vm(&a).unwrap();
        store.insert_vm(&b).unwrap();
        assert_eq!(store.get_vm(&a.id).unwrap().as_ref(), Some(&a));
        assert_eq!(store.get_vm(&b.id).unwrap().as_ref(), Some(&b));
        assert_eq!(store.find_vm("full-vm").unwrap().as_ref(), Some(&a));
        assert_eq!(store.find_vm("nope").unwrap(), None);
        drop(store);
        // And from a fresh process's point of view.
        let reopened = Store::open(&path).unwrap();
        assert_eq!(reopened.list_vms().unwrap(), vec![b, a]);
    }

    #[test]
    fn a_deleting_mark_survives_reopening_and_goes_with_the_row() {
        let (_dir, path, store) = open_temp();
        let a = full("00000000000000aa", "full-vm");
        store.insert_vm(&a).unwrap();
        assert!(!store.is_deleting(&a.id).unwrap());
        store.set_deleting(&a.id, true).unwrap();
        store.set_deleting(&a.id, true).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(store.is_deleting(&a.id).unwrap());
        store.set_deleting(&a.id, false).unwrap();
        assert!(!store.is_deleting(&a.id).unwrap());
        store.set_deleting(&a.id, true).unwrap();
        assert!(store.delete_vm(&a.id).unwrap());
        assert!(!store.is_deleting(&a.id).unwrap());
    }

    #[test]
    fn a_pooled_vm_is_listed_but_not_found_by_name_until_it_is_taken() {
        let (_dir, path, store) = open_temp();
        let a = full("00000000000000aa", "pool-vm");
        store.insert_pooled_vm(&a, Some("debian")).unwrap();
        let b = minimal("00000000000000bb", "user-vm", 5);
        store.insert_vm(&b).unwrap();
        assert_eq!(store.find_vm("pool-vm").unwrap(), None);
        assert_eq!(store.find_vm("user-vm").unwrap(), Some(b.clone()));
        assert_eq!(store.get_vm(&a.id).unwrap(), Some(a.clone()));
        assert_eq!(store.list_vms().unwrap().len(), 2);
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.pooled().unwrap(),
            vec![(a.id.clone(), Some("debian".to_string()))]
        );
        assert!(store.is_pooled(&a.id).unwrap());
        // The name is taken while pooled, as any VM's is.
        let clash = minimal("00000000000000cc", "pool-vm", 6);
        assert!(matches!(
            store.insert_pooled_vm(&clash, None),
            Err(StoreError::NameTaken(_))
        ));
        // A failed insert leaves no pool row behind.
        assert_eq!(store.pooled().unwrap().len(), 1);
        assert!(store.unpool(&a.id).unwrap());
        assert!(!store.unpool(&a.id).unwrap());
        assert_eq!(store.find_vm("pool-vm").unwrap(), Some(a.clone()));
        // Deleting a pooled VM takes its pool row with it.
        let c = minimal("00000000000000dd", "pool-vm2", 7);
        store.insert_pooled_vm(&c, None).unwrap();
        assert!(store.delete_vm(&c.id).unwrap());
        assert!(store.pooled().unwrap().is_empty());
    }

    #[test]
    fn scalar_fields_are_real_columns() {
        let (_dir, _path, store) = open_temp();
        let a = full("00000000000000aa", "full-vm");
        store.insert_vm(&a).unwrap();
        let conn = store.lock();
        let (pid, stage, disk): (i64, String, i64) = conn
            .query_row(
                "SELECT pid, failed_stage, disk_size FROM vms WHERE name = 'full-vm'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(pid, 4242);
        assert_eq!(stage, "prepare_host:work-disk");
        assert_eq!(disk, 20 << 30);
    }

    #[test]
    fn refuses_a_second_vm_with_the_same_name() {
        let (_dir, _path, store) = open_temp();
        let first = minimal("0000000000000001", "dup", 1);
        store.insert_vm(&first).unwrap();
        let mut second = minimal("0000000000000002", "dup", 2);
        second.spec.vcpus = 3;
        let err = store.insert_vm(&second).unwrap_err();
        assert!(
            matches!(&err, StoreError::NameTaken(n) if n.as_str() == "dup"),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"dup\" already exists"), "{err}");
        assert_eq!(store.list_vms().unwrap(), vec![first]);
        let err = store
            .insert_vm(&minimal("0000000000000001", "other", 3))
            .unwrap_err();
        assert!(matches!(err, StoreError::IdTaken(_)), "{err:?}");
    }

    #[test]
    fn update_replaces_fields_and_refuses_unknown_or_clashing_vms() {
        let (_dir, _path, store) = open_temp();
        let mut vm = minimal("0000000000000001", "one", 1);
        store.insert_vm(&vm).unwrap();
        store
            .insert_vm(&minimal("0000000000000002", "two", 2))
            .unwrap();
        let mut updated = full("0000000000000001", "renamed");
        updated.created_at = vm.created_at;
        store.update_vm(&updated).unwrap();
        assert_eq!(store.get_vm(&vm.id).unwrap(), Some(updated.clone()));
        assert_eq!(store.find_vm("one").unwrap(), None);

        updated.name = VmName::parse("two").unwrap();
        let err = store.update_vm(&updated).unwrap_err();
        assert!(matches!(err, StoreError::NameTaken(_)), "{err:?}");

        vm.id = VmId::from_stored("00000000000000ff".into());
        let err = store.update_vm(&vm).unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound(id) if id.as_str() == "00000000000000ff"),
            "{err:?}"
        );
        assert_eq!(store.list_vms().unwrap().len(), 2);
    }

    #[test]
    fn delete_reports_whether_the_vm_existed() {
        let (_dir, _path, store) = open_temp();
        let vm = minimal("0000000000000001", "one", 1);
        store.insert_vm(&vm).unwrap();
        assert!(store.delete_vm(&vm.id).unwrap());
        assert!(!store.delete_vm(&vm.id).unwrap());
        assert_eq!(store.get_vm(&vm.id).unwrap(), None);
        // The name is free again.
        store
            .insert_vm(&minimal("0000000000000002", "one", 2))
            .unwrap();
    }

    #[test]
    fn lists_by_creation_time_then_name() {
        let (_dir, _path, store) = open_temp();
        for (id, name, t) in [("03", "c", 20), ("01", "b", 10), ("02", "a", 10)] {
            store
                .insert_vm(&minimal(&format!("00000000000000{id}"), name, t))
                .unwrap();
        }
        let names: Vec<String> = store
            .list_vms()
            .unwrap()
            .into_iter()
            .map(|v| v.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn connection_pragmas_are_set() {
        let (_dir, path, store) = open_temp();
        {
            let conn = store.lock();
            let q = |p: &str| -> String {
                conn.query_row(&format!("PRAGMA {p}"), [], |r| {
                    r.get::<_, rusqlite::types::Value>(0)
                })
                .map(|v| match v {
                    rusqlite::types::Value::Integer(n) => n.to_string(),
                    rusqlite::types::Value::Text(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap()
            };
            assert_eq!(q("journal_mode"), "wal");
            assert_eq!(q("foreign_keys"), "1");
            assert_eq!(q("synchronous"), "1"); // NORMAL
            assert_eq!(q("busy_timeout"), "5000");
        }
        // WAL is persistent: a plain connection sees it too.
        let raw = Connection::open(&path).unwrap();
        let mode: String = raw
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn concurrent_writers_on_two_connections_wait_instead_of_failing() {
        let (_dir, path, first) = open_temp();
        let second = Store::open(&path).unwrap();
        std::thread::scope(|s| {
            for (t, store) in [(1u64, &first), (2, &second)] {
                s.spawn(move || {
                    for i in 0..50u64 {
                        let vm = minimal(&format!("{t:08x}{i:08x}"), &format!("vm-{t}-{i}"), i);
                        store.insert_vm(&vm).unwrap();
                    }
                });
            }
        });
        assert_eq!(first.list_vms().unwrap().len(), 100);
    }

    #[test]
    fn migrates_an_empty_database_and_reopens_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        // An existing, empty SQLite file (version 0).
        Connection::open(&path)
            .unwrap()
            .execute_batch("VACUUM")
            .unwrap();
        let store = Store::open(&path).unwrap();
        store
            .insert_vm(&minimal("0000000000000001", "keep", 1))
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.list_vms().unwrap().len(), 1);
        let version: i64 = store
            .lock()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_vm_stored_before_start_timings_keeps_its_row_and_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        // The schema as the banger before the `last_start` column left it.
        let before = MIGRATIONS
            .iter()
            .position(|m| m.contains("last_start"))
            .unwrap();
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn, &path, &MIGRATIONS[..before]).unwrap();
        let (old_columns, _) = COLUMNS.split_once(", last_start").unwrap();
        conn.execute(
            &format!(
                "INSERT INTO vms ({old_columns}) SELECT 'aa00000000000001', 'old', 'stopped', \
                 1, 256, 1048576, '/k', NULL, '/r', NULL, 'firecracker', NULL, NULL, NULL, \
                 NULL, NULL, NULL, 1, '[]', '[]', NULL, NULL, 5, 6"
            ),
            [],
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path).unwrap();
        let mut vm = store.find_vm("old").unwrap().expect("the old row");
        assert_eq!(vm.last_start, None);
        vm.last_start = full("aa00000000000002", "x").last_start;
        store.update_vm(&vm).unwrap();
        drop(store);
        let again = Store::open(&path).unwrap().find_vm("old").unwrap().unwrap();
        assert_eq!(again.last_start, vm.last_start, "kept across reopening");
    }

    #[test]
    fn refuses_a_database_from_a_newer_banger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::TooNew { found: 99, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("schema version 99"), "{msg}");
        assert!(msg.contains("upgrade banger"), "{msg}");
        // Nothing was created in it.
        let tables: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0);
    }

    #[test]
    fn a_failing_migration_step_leaves_the_database_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        let mut conn = Connection::open(&path).unwrap();
        configure(&conn).unwrap();
        migrate(&mut conn, &path, MIGRATIONS).unwrap();
        let mut steps: Vec<&str> = MIGRATIONS.to_vec();
        // Succeeds halfway (creates a table, alters vms), then fails.
        steps.push(
            "CREATE TABLE later_table (id TEXT); ALTER TABLE vms ADD COLUMN x INTEGER; \
             INSERT INTO no_such_table VALUES (1);",
        );
        let err = migrate(&mut conn, &path, &steps).unwrap_err();
        let want = MIGRATIONS.len() as i64 + 1;
        assert!(
            matches!(err, StoreError::Migrate { version, .. } if version == want),
            "{err:?}"
        );
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let later: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'later_table'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(later, 0);
        let has_x: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('vms') WHERE name = 'x'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(has_x, 0);
    }

    #[test]
    fn an_undecodable_row_names_the_vm_and_column() {
        let (_dir, _path, store) = open_temp();
        store
            .insert_vm(&minimal("00000000000000c0", "bad", 1))
            .unwrap();
        store
            .lock()
            .execute("UPDATE vms SET caps = 'not json' WHERE name = 'bad'", [])
            .unwrap();
        let err = store.list_vms().unwrap_err();
        assert!(
            matches!(&err, StoreError::Decode { column: "caps", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("00000000000000c0"), "{err}");

        store
            .lock()
            .execute(
                "UPDATE vms SET caps = '[]', state = 'flying' WHERE name = 'bad'",
                [],
            )
            .unwrap();
        let err = store.find_vm("bad").unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Decode {
                    column: "state",
                    ..
                }
            ),
            "{err:?}"
        );

        store
            .lock()
            .execute(
                "UPDATE vms SET state = 'running', pid = 7 WHERE name = 'bad'",
                [],
            )
            .unwrap();
        let err = store.find_vm("bad").unwrap_err();
        assert!(
            matches!(&err, StoreError::Decode { column: "pid", .. }),
            "{err:?}"
        );
    }
}
