//! The `images` table: one row per image, the record as JSON beside the
//! columns we look up by.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, constraint_column};
use banger_api::model::ImageRecord;

fn image_err(
    op: &'static str,
    name: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Image {
        op,
        name: name.to_string(),
        source: Box::new(e),
    }
}

impl Store {
    /// Records a new image; [`StoreError::ImageNameTaken`] if the name is used.
    pub fn insert_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(image).map_err(|e| image_err("encode", &image.name, e))?;
        let res = self.lock().execute(
            "INSERT INTO images (name, rootfs, record, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                image.name,
                image.rootfs.to_string_lossy(),
                json,
                image.created_at as i64
            ],
        );
        match res {
            Ok(_) => Ok(()),
            Err(e) if constraint_column(&e) == Some("images.name") => {
                Err(StoreError::ImageNameTaken(image.name.clone()))
            }
            Err(e) => Err(image_err("insert", &image.name, e)),
        }
    }

    /// The image with this name, if any.
    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let json: Option<String> = self
            .lock()
            .query_row(
                "SELECT record FROM images WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| image_err("read", name, e))?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| image_err("decode", name, e)))
            .transpose()
    }

    /// Every image, by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT name, record FROM images ORDER BY name")
            .map_err(|e| image_err("read", "*", e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| image_err("read", "*", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, json) = row.map_err(|e| image_err("read", "*", e))?;
            out.push(serde_json::from_str(&json).map_err(|e| image_err("decode", &name, e))?);
        }
        Ok(out)
    }

    /// Removes an image row; returns whether it existed.
    pub fn delete_image(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute("DELETE FROM images WHERE name = ?1", params![name])
            .map_err(|e| image_err("delete", name, e))?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreError};
    use banger_api::model::{ImageKernel, ImageRecord, ImageSource};

    fn image(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.to_string(),
            rootfs: format!("/state/images/{name}/rootfs.ext4").into(),
            kernel: ImageKernel::Named {
                name: "fc-6.12".into(),
            },
            source: ImageSource::Oci {
                reference: "127.0.0.1:5000/debian:bookworm".into(),
                digest: "sha256:abc".into(),
            },
            managed: true,
            size_bytes: 1 << 30,
            layers: vec!["sha256:l1".into(), "sha256:l2".into()],
            created_at: 42,
        }
    }

    #[test]
    fn images_round_trip_list_by_name_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store.insert_image(&image("zeta")).unwrap();
        let mut reg = image("alpha");
        reg.kernel = ImageKernel::Files {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
        };
        reg.source = ImageSource::Registered;
        reg.managed = false;
        store.insert_image(&reg).unwrap();
        assert_eq!(store.get_image("alpha").unwrap(), Some(reg.clone()));
        assert_eq!(store.get_image("zeta").unwrap(), Some(image("zeta")));
        let names: Vec<String> = store
            .list_images()
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert!(
            matches!(store.insert_image(&image("zeta")), Err(StoreError::ImageNameTaken(n)) if n == "zeta")
        );
        assert!(store.delete_image("zeta").unwrap());
        assert!(!store.delete_image("zeta").unwrap());
        assert_eq!(store.get_image("zeta").unwrap(), None);
        // Survives reopening (and the migration is not re-applied).
        drop(store);
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.get_image("alpha").unwrap(), Some(reg));
    }
}
