//! Durable state a capability keeps in the daemon's database: its own tables,
//! created and upgraded by its own migrations (versioned per owner in
//! `cap_schema`), and plain connection or transaction access to them. The
//! core knows nothing about what the tables hold.

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Store, StoreError};

impl Store {
    /// Brings the tables of capability `owner` up to `migrations.len()`:
    /// step `i` brings it to version `i + 1`, recorded in `cap_schema`. Steps
    /// already applied are skipped, so calling this again is cheap and
    /// harmless. The missing steps run in one IMMEDIATE transaction: two
    /// processes cannot both apply them, and a failing step leaves the owner
    /// at its previous version. Never edit a released step; append one.
    pub fn capability_tables(&self, owner: &str, migrations: &[&str]) -> Result<(), StoreError> {
        let supported = migrations.len() as i64;
        let err = |version| {
            let owner = owner.to_string();
            move |source| StoreError::CapabilityMigrate {
                owner,
                version,
                source,
            }
        };
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err(supported))?;
        let current: i64 = tx
            .query_row(
                "SELECT version FROM cap_schema WHERE owner = ?1",
                params![owner],
                |r| r.get(0),
            )
            .optional()
            .map_err(err(supported))?
            .unwrap_or(0);
        if current > supported {
            return Err(StoreError::CapabilityTooNew {
                owner: owner.to_string(),
                found: current,
                supported,
            });
        }
        if current == supported {
            return Ok(());
        }
        for (i, sql) in migrations.iter().enumerate().skip(current.max(0) as usize) {
            tx.execute_batch(sql).map_err(err(i as i64 + 1))?;
        }
        tx.execute(
            "INSERT INTO cap_schema (owner, version) VALUES (?1, ?2) \
             ON CONFLICT (owner) DO UPDATE SET version = excluded.version",
            params![owner, supported],
        )
        .map_err(err(supported))?;
        tx.commit().map_err(err(supported))
    }

    /// Runs `f` on the database connection: reads and single statements.
    /// Other users of the store wait until it returns.
    pub fn with_connection<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        f(&self.lock())
    }

    /// Runs `f` in an IMMEDIATE transaction (the write lock is taken before
    /// the first read, so two processes cannot act on the same snapshot) and
    /// commits when it returns `Ok`; on `Err` nothing it wrote is kept.
    pub fn with_transaction<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::Transaction)?;
        let out = f(&tx)?;
        tx.commit().map_err(StoreError::Transaction)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: &[&str] = &[
        "CREATE TABLE things (id TEXT PRIMARY KEY NOT NULL)",
        "ALTER TABLE things ADD COLUMN size INTEGER",
    ];

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("banger.db")).unwrap()
    }

    fn version(store: &Store, owner: &str) -> Option<i64> {
        store.with_connection(|c| {
            c.query_row(
                "SELECT version FROM cap_schema WHERE owner = ?1",
                [owner],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
        })
    }

    #[test]
    fn applies_each_owners_steps_once_and_upgrades_by_appended_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.capability_tables("a", &STEPS[..1]).unwrap();
        store
            .with_connection(|c| c.execute("INSERT INTO things (id) VALUES ('x')", []))
            .unwrap();
        // Again, and after reopening: step 1 is not re-run (it would fail
        // on the existing table) and the row stays.
        store.capability_tables("a", &STEPS[..1]).unwrap();
        drop(store);
        let store = open(&dir);
        store.capability_tables("a", &STEPS[..1]).unwrap();
        assert_eq!(version(&store, "a"), Some(1));
        // An appended step runs alone.
        store.capability_tables("a", STEPS).unwrap();
        assert_eq!(version(&store, "a"), Some(2));
        let rows: i64 = store.with_connection(|c| {
            c.query_row("SELECT count(*) FROM things WHERE size IS NULL", [], |r| {
                r.get(0)
            })
            .unwrap()
        });
        assert_eq!(rows, 1);
        // Owners are versioned apart.
        assert_eq!(version(&store, "b"), None);
        store
            .capability_tables("b", &["CREATE TABLE other (id TEXT)"])
            .unwrap();
        assert_eq!(version(&store, "b"), Some(1));
        assert_eq!(version(&store, "a"), Some(2));
    }

    #[test]
    fn a_failing_step_keeps_the_previous_version_and_names_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.capability_tables("a", &STEPS[..1]).unwrap();
        let steps = [STEPS[0], STEPS[1], "INSERT INTO no_such_table VALUES (1)"];
        let err = store.capability_tables("a", &steps).unwrap_err();
        assert!(
            matches!(&err, StoreError::CapabilityMigrate { owner, version: 3, .. } if owner == "a"),
            "{err:?}"
        );
        assert_eq!(version(&store, "a"), Some(1));
        // Step 2 ran inside the failed transaction and was rolled back.
        let has_size: i64 = store.with_connection(|c| {
            c.query_row(
                "SELECT count(*) FROM pragma_table_info('things') WHERE name = 'size'",
                [],
                |r| r.get(0),
            )
            .unwrap()
        });
        assert_eq!(has_size, 0);
    }

    #[test]
    fn refuses_tables_from_a_newer_banger() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.capability_tables("a", STEPS).unwrap();
        let err = store.capability_tables("a", &STEPS[..1]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::CapabilityTooNew {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("\"a\"") && msg.contains("upgrade banger"),
            "{msg}"
        );
    }

    #[test]
    fn a_transaction_commits_on_ok_and_keeps_nothing_on_err() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.capability_tables("a", &STEPS[..1]).unwrap();
        store
            .with_transaction(|tx| {
                tx.execute("INSERT INTO things (id) VALUES ('kept')", [])
                    .map_err(StoreError::Read)
            })
            .unwrap();
        let err = store
            .with_transaction(|tx| {
                tx.execute("INSERT INTO things (id) VALUES ('dropped')", [])
                    .map_err(StoreError::Read)?;
                Err::<(), _>(StoreError::NotFound(banger_api::model::VmId::from_stored(
                    "x".into(),
                )))
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        let ids: Vec<String> = store.with_connection(|c| {
            let mut stmt = c.prepare("SELECT id FROM things").unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        });
        assert_eq!(ids, ["kept"]);
    }
}
