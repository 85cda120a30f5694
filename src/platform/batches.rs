//! Batches of the Batch API: each stored as its API object, with its status beside it so that
//! a status change is a compare-and-set (a cancel and the batch's runner race on it) and the
//! unfinished ones can be found again when the server restarts.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::store::{Store, StoreError};

/// Statuses of a batch still running (or about to).
pub const UNFINISHED: [&str; 4] = ["validating", "in_progress", "finalizing", "cancelling"];

/// A stored batch: its owner and API object.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRecord {
    pub project: String,
    pub token_id: Option<String>,
    pub object: Value,
}

impl BatchRecord {
    pub fn id(&self) -> &str {
        self.object["id"].as_str().unwrap_or("")
    }

    pub fn status(&self) -> &str {
        self.object["status"].as_str().unwrap_or("")
    }
}

fn parse(
    project: String,
    token_id: Option<String>,
    object: String,
) -> rusqlite::Result<BatchRecord> {
    let object = serde_json::from_str(&object).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(BatchRecord {
        project,
        token_id,
        object,
    })
}

impl Store {
    /// Writes a batch whatever its stored status (creation, and restarts).
    pub fn put_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO batches (id, project, token_id, status, object) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET status = excluded.status, object = excluded.object",
                params![b.id(), b.project, b.token_id, b.status(), b.object.to_string()],
            )
            .map(drop)
        })
    }

    /// Writes `object` if the stored batch is still in status `expected`; false when another
    /// writer moved it on first.
    pub fn update_batch(&self, expected: &str, object: &Value) -> Result<bool, StoreError> {
        let id = object["id"].as_str().unwrap_or("");
        let status = object["status"].as_str().unwrap_or("");
        self.with(|c| {
            c.execute(
                "UPDATE batches SET status = ?1, object = ?2 WHERE id = ?3 AND status = ?4",
                params![status, object.to_string(), id, expected],
            )
        })
        .map(|n| n > 0)
    }

    /// The batch `id` if `project` owns it.
    pub fn batch(&self, project: &str, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT project, token_id, object FROM batches WHERE id = ?1 AND project = ?2",
                params![id, project],
                |r| parse(r.get(0)?, r.get(1)?, r.get(2)?),
            )
            .optional()
        })
    }

    /// A project's batches, newest first.
    pub fn batches(&self, project: &str) -> Result<Vec<BatchRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT project, token_id, object FROM batches WHERE project = ?1
                 ORDER BY rowid DESC",
            )?;
            let rows =
                stmt.query_map(params![project], |r| parse(r.get(0)?, r.get(1)?, r.get(2)?))?;
            rows.collect()
        })
    }

    /// Every batch not yet in a final status, oldest first.
    pub fn unfinished_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT project, token_id, object FROM batches
                 WHERE status IN (?1, ?2, ?3, ?4) ORDER BY rowid",
            )?;
            let rows = stmt.query_map(
                params![UNFINISHED[0], UNFINISHED[1], UNFINISHED[2], UNFINISHED[3]],
                |r| parse(r.get(0)?, r.get(1)?, r.get(2)?),
            )?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_status_change_is_a_compare_and_set() {
        let dir = std::env::temp_dir().join(format!("candela-batches-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        let b = BatchRecord {
            project: "a".into(),
            token_id: Some("tok".into()),
            object: json!({"id": "batch_1", "status": "in_progress"}),
        };
        store.put_batch(&b).unwrap();
        assert_eq!(store.batch("a", "batch_1").unwrap(), Some(b.clone()));
        assert_eq!(store.batch("b", "batch_1").unwrap(), None);
        assert_eq!(store.unfinished_batches().unwrap().len(), 1);
        // A cancel moves it on; the runner's next save then fails and it learns of the cancel.
        let cancelling = json!({"id": "batch_1", "status": "cancelling"});
        assert!(store.update_batch("in_progress", &cancelling).unwrap());
        assert!(!store
            .update_batch(
                "in_progress",
                &json!({"id": "batch_1", "status": "in_progress"})
            )
            .unwrap());
        assert!(store
            .update_batch(
                "cancelling",
                &json!({"id": "batch_1", "status": "cancelled"})
            )
            .unwrap());
        assert!(store.unfinished_batches().unwrap().is_empty());
        assert_eq!(store.batches("a").unwrap()[0].status(), "cancelled");
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
