//! Uploads (`/v1/uploads`): a large file sent in parts, each its own request, then put together
//! into one file of the Files API. The upload and its parts are rows of the database; each
//! part's bytes live under `DATA_DIR/uploads/UPLOAD_ID/PART_ID`, written whole before the part
//! is listed (see [`super::files::NewFile`]). An upload is `pending` until it is completed (its
//! file is then listed with the project's files and its parts removed), cancelled, or an hour
//! old (`expired`). While its parts are being put together it is `completing`: it takes no
//! parts, cancel or second completion meanwhile, and its parts stay. Each belongs to the project
//! that created it.

use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use serde_json::{json, Value};

use super::files::FileRecord;
use super::store::{Store, StoreError};

/// How long an upload takes parts, as OpenAI's do.
pub const UPLOAD_TTL_S: i64 = 3600;
/// The largest part, as OpenAI's.
pub const MAX_PART_BYTES: u64 = 64 << 20;
pub const PENDING: &str = "pending";
/// Being put together by a `complete` call.
const COMPLETING: &str = "completing";

/// The most bytes an upload's parts may hold together: twice its bytes, or its bytes and a
/// part, whichever is more. Parts beyond its bytes are allowed (a part sent again after a lost
/// answer, one left out of `part_ids`), within a bound on the disk they take.
pub fn parts_limit(bytes: u64) -> u64 {
    bytes
        .saturating_mul(2)
        .max(bytes.saturating_add(MAX_PART_BYTES))
}

#[derive(Clone, Debug, PartialEq)]
pub struct UploadRecord {
    pub id: String,
    pub project: String,
    pub filename: String,
    pub purpose: String,
    pub mime_type: String,
    pub bytes: u64,
    pub created_at: i64,
    pub expires_at: i64,
    /// `pending`, `completing`, `completed`, `cancelled` or `expired` as stored; see
    /// [`UploadRecord::status`].
    pub status: String,
    pub file_id: Option<String>,
}

impl UploadRecord {
    /// The status at `now`: a pending upload past its hour is `expired`.
    pub fn status(&self, now: i64) -> &str {
        if self.status == PENDING && now >= self.expires_at {
            "expired"
        } else {
            &self.status
        }
    }

    /// The upload object of the API, with its file once completed.
    pub fn json(&self, now: i64, file: Option<&FileRecord>) -> Value {
        json!({
            "id": self.id,
            "object": "upload",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status(now),
            "expires_at": self.expires_at,
            "file": file.map(FileRecord::json),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PartRecord {
    pub id: String,
    pub upload: String,
    pub bytes: u64,
    pub created_at: i64,
}

impl PartRecord {
    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "upload.part",
            "created_at": self.created_at,
            "upload_id": self.upload,
        })
    }
}

/// Where an upload's parts live.
pub fn parts_dir(data_dir: &Path, upload: &str) -> PathBuf {
    data_dir.join("uploads").join(upload)
}

/// Why a part could not be added, or an upload completed or cancelled.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// Not pending: the status it has.
    NotPending(String),
    /// The parts would add up to more than the upload's bytes: the bytes it already has.
    TooLarge(u64),
}

fn upload(r: &rusqlite::Row) -> rusqlite::Result<UploadRecord> {
    Ok(UploadRecord {
        id: r.get(0)?,
        project: r.get(1)?,
        filename: r.get(2)?,
        purpose: r.get(3)?,
        mime_type: r.get(4)?,
        bytes: r.get::<_, i64>(5)? as u64,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        status: r.get(8)?,
        file_id: r.get(9)?,
    })
}

const COLUMNS: &str =
    "id, project, filename, purpose, mime_type, bytes, created_at, expires_at, status, file_id";

/// Whether `u` is `want` at `now`; else its status.
fn is(u: &UploadRecord, want: &str, now: i64) -> Result<(), Refused> {
    match u.status(now) {
        s if s == want => Ok(()),
        other => Err(Refused::NotPending(other.to_string())),
    }
}

/// The upload `id` of `project`, within a transaction.
fn upload_in(
    tx: &rusqlite::Transaction,
    project: &str,
    id: &str,
) -> rusqlite::Result<UploadRecord> {
    tx.query_row(
        &format!("SELECT {COLUMNS} FROM uploads WHERE id = ?1 AND project = ?2"),
        params![id, project],
        upload,
    )
}

impl Store {
    pub fn insert_upload(&self, u: &UploadRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO uploads ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    u.id,
                    u.project,
                    u.filename,
                    u.purpose,
                    u.mime_type,
                    u.bytes as i64,
                    u.created_at,
                    u.expires_at,
                    u.status,
                    u.file_id
                ],
            )
            .map(drop)
        })
    }

    /// The upload `id` if `project` owns it.
    pub fn upload(&self, project: &str, id: &str) -> Result<Option<UploadRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM uploads WHERE id = ?1 AND project = ?2"),
                params![id, project],
                upload,
            )
            .optional()
        })
    }

    /// Lists a part whose bytes are in place, if the upload is pending at `now` and its parts
    /// stay within [`parts_limit`]; in one transaction, so that parts sent at once are counted
    /// right.
    pub fn add_part(
        &self,
        project: &str,
        part: &PartRecord,
        now: i64,
    ) -> Result<Result<(), Refused>, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let u = upload_in(&tx, project, &part.upload)?;
            if let Err(refused) = is(&u, PENDING, now) {
                return Ok(Err(refused));
            }
            let have: i64 = tx.query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM upload_parts WHERE upload = ?1",
                params![part.upload],
                |r| r.get(0),
            )?;
            if have as u64 + part.bytes > parts_limit(u.bytes) {
                return Ok(Err(Refused::TooLarge(have as u64)));
            }
            tx.execute(
                "INSERT INTO upload_parts (id, upload, bytes, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![part.id, part.upload, part.bytes as i64, part.created_at],
            )?;
            tx.commit().map(|()| Ok(()))
        })
    }

    /// An upload's parts, in the order they came.
    pub fn parts(&self, upload: &str) -> Result<Vec<PartRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, upload, bytes, created_at FROM upload_parts
                 WHERE upload = ?1 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![upload], |r| {
                Ok(PartRecord {
                    id: r.get(0)?,
                    upload: r.get(1)?,
                    bytes: r.get::<_, i64>(2)? as u64,
                    created_at: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Moves an upload pending at `now` to `status`, forgetting its parts with `forget_parts`;
    /// else why not. In one transaction: of calls racing on an upload, one moves it.
    fn leave_pending(
        &self,
        project: &str,
        id: &str,
        now: i64,
        status: &str,
        forget_parts: bool,
    ) -> Result<Result<UploadRecord, Refused>, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let u = upload_in(&tx, project, id)?;
            if let Err(refused) = is(&u, PENDING, now) {
                return Ok(Err(refused));
            }
            tx.execute(
                "UPDATE uploads SET status = ?2 WHERE id = ?1",
                params![id, status],
            )?;
            if forget_parts {
                tx.execute("DELETE FROM upload_parts WHERE upload = ?1", params![id])?;
            }
            tx.commit().map(|()| Ok(u))
        })
    }

    /// Moves an upload pending at `now` to `completing`, for one `complete` call to put its
    /// parts together undisturbed; else why not.
    pub fn begin_completion(
        &self,
        project: &str,
        id: &str,
        now: i64,
    ) -> Result<Result<UploadRecord, Refused>, StoreError> {
        self.leave_pending(project, id, now, COMPLETING, false)
    }

    /// A completion that failed (a wrong md5, a disk error) leaves the upload pending again.
    pub fn abandon_completion(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE uploads SET status = ?2 WHERE id = ?1 AND status = ?3",
                params![id, PENDING, COMPLETING],
            )
            .map(drop)
        })
    }

    /// Lists the file an upload's parts made and marks the upload completed, if this call is
    /// completing it: one transaction, so that an upload completes into one file at most.
    pub fn complete_upload(
        &self,
        project: &str,
        id: &str,
        file: &FileRecord,
    ) -> Result<Result<(), Refused>, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let u = upload_in(&tx, project, id)?;
            if u.status != COMPLETING {
                return Ok(Err(Refused::NotPending(u.status)));
            }
            tx.execute(
                "INSERT INTO files (id, project, filename, purpose, bytes, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    file.id,
                    file.project,
                    file.filename,
                    file.purpose,
                    file.bytes as i64,
                    file.created_at
                ],
            )?;
            tx.execute(
                "UPDATE uploads SET status = 'completed', file_id = ?2 WHERE id = ?1",
                params![id, file.id],
            )?;
            tx.execute("DELETE FROM upload_parts WHERE upload = ?1", params![id])?;
            tx.commit().map(|()| Ok(()))
        })
    }

    /// Cancels an upload that is pending at `now`; its parts are forgotten.
    pub fn cancel_upload(
        &self,
        project: &str,
        id: &str,
        now: i64,
    ) -> Result<Result<(), Refused>, StoreError> {
        Ok(self
            .leave_pending(project, id, now, "cancelled", true)?
            .map(drop))
    }

    /// Forgets the parts of uploads that are past their hour at `now`; returns those uploads'
    /// ids, whose bytes the caller removes.
    pub fn expire_uploads(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let ids = {
                let mut stmt = tx.prepare(
                    "SELECT id FROM uploads WHERE status = 'pending' AND expires_at <= ?1",
                )?;
                let rows = stmt.query_map(params![now], |r| r.get::<_, String>(0))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            for id in &ids {
                tx.execute(
                    "UPDATE uploads SET status = 'expired' WHERE id = ?1",
                    params![id],
                )?;
                tx.execute("DELETE FROM upload_parts WHERE upload = ?1", params![id])?;
            }
            tx.commit().map(|()| ids)
        })
    }
}

/// Removes the part files of uploads that no longer take parts: those `expire_uploads` just
/// expired, and any folder whose upload has ended (a server stopped between the database and
/// the disk). Returns how many folders it removed.
pub fn sweep(store: &Store, data_dir: &Path, now: i64) -> Result<usize, StoreError> {
    store.expire_uploads(now)?;
    let Ok(entries) = std::fs::read_dir(data_dir.join("uploads")) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        let status: Option<String> = store.with(|c| {
            c.query_row(
                "SELECT status FROM uploads WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
        })?;
        let in_use = matches!(status.as_deref(), Some(PENDING | COMPLETING));
        if !in_use && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending_upload(id: &str, bytes: u64, now: i64) -> UploadRecord {
        UploadRecord {
            id: id.into(),
            project: "a".into(),
            filename: "big.jsonl".into(),
            purpose: "batch".into(),
            mime_type: "application/jsonl".into(),
            bytes,
            created_at: now,
            expires_at: now + UPLOAD_TTL_S,
            status: "pending".into(),
            file_id: None,
        }
    }

    fn part(id: &str, upload: &str, bytes: u64) -> PartRecord {
        PartRecord {
            id: id.into(),
            upload: upload.into(),
            bytes,
            created_at: 1,
        }
    }

    #[test]
    fn parts_stay_within_the_limit_and_an_upload_completes_once() {
        let dir = std::env::temp_dir().join(format!("candela-uploads-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        store
            .insert_upload(&pending_upload("upload_1", 10, 100))
            .unwrap();
        assert_eq!(store.upload("b", "upload_1").unwrap(), None);
        // Another project's upload is not found, so its parts are refused.
        assert!(store
            .add_part("b", &part("p0", "upload_1", 1), 100)
            .is_err());
        let add = |p: PartRecord| store.add_part("a", &p, 100).unwrap();
        assert_eq!(add(part("p1", "upload_1", 6)), Ok(()));
        // Parts may go past the upload's bytes (a part sent twice), within `parts_limit`.
        assert_eq!(add(part("p2", "upload_1", 6)), Ok(()));
        assert_eq!(parts_limit(10), 10 + MAX_PART_BYTES);
        assert_eq!(
            add(part("p9", "upload_1", MAX_PART_BYTES)),
            Err(Refused::TooLarge(12))
        );
        assert_eq!(add(part("p3", "upload_1", 4)), Ok(()));
        let ids: Vec<String> = store
            .parts("upload_1")
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["p1", "p2", "p3"]);

        let file = FileRecord {
            id: "file-1".into(),
            project: "a".into(),
            filename: "big.jsonl".into(),
            purpose: "batch".into(),
            bytes: 10,
            created_at: 101,
        };
        // Not begun: nothing to complete.
        let not = |status: &str| Err(Refused::NotPending(status.into()));
        assert_eq!(
            store.complete_upload("a", "upload_1", &file).unwrap(),
            not("pending")
        );
        // A failed completion leaves it pending; while one runs, the upload takes nothing else.
        assert!(store
            .begin_completion("a", "upload_1", 101)
            .unwrap()
            .is_ok());
        store.abandon_completion("upload_1").unwrap();
        assert!(store
            .begin_completion("a", "upload_1", 101)
            .unwrap()
            .is_ok());
        assert_eq!(add(part("p4", "upload_1", 1)), not("completing"));
        assert_eq!(
            store.cancel_upload("a", "upload_1", 101).unwrap(),
            not("completing")
        );
        let again = store.begin_completion("a", "upload_1", 101).unwrap();
        assert_eq!(again.map(drop), not("completing"));
        std::fs::create_dir_all(parts_dir(&dir, "upload_1")).unwrap();
        assert_eq!(
            sweep(&store, &dir, 101).unwrap(),
            0,
            "a completing upload keeps its parts"
        );
        assert_eq!(
            store.complete_upload("a", "upload_1", &file).unwrap(),
            Ok(())
        );
        let second = FileRecord {
            id: "file-2".into(),
            ..file.clone()
        };
        assert_eq!(
            store.complete_upload("a", "upload_1", &second).unwrap(),
            not("completed")
        );
        assert_eq!(store.file("a", "file-2").unwrap(), None);
        assert_eq!(store.file("a", "file-1").unwrap(), Some(file));
        let done = store.upload("a", "upload_1").unwrap().unwrap();
        assert_eq!(
            (done.status(5000), done.file_id.as_deref()),
            ("completed", Some("file-1"))
        );
        assert!(store.parts("upload_1").unwrap().is_empty());
        assert_eq!(
            store.cancel_upload("a", "upload_1", 103).unwrap(),
            not("completed")
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_upload_past_its_hour_expires_and_its_parts_go() {
        let dir = std::env::temp_dir().join(format!("candela-uploads-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        store
            .insert_upload(&pending_upload("upload_old", 10, 0))
            .unwrap();
        store
            .insert_upload(&pending_upload("upload_new", 10, 3000))
            .unwrap();
        store
            .insert_upload(&pending_upload("upload_gone", 10, 3000))
            .unwrap();
        assert_eq!(
            store
                .add_part("a", &part("p1", "upload_old", 2), 10)
                .unwrap(),
            Ok(())
        );
        for id in ["upload_old", "upload_new", "upload_gone"] {
            std::fs::create_dir_all(parts_dir(&dir, id)).unwrap();
        }
        assert_eq!(
            store.cancel_upload("a", "upload_gone", 3001).unwrap(),
            Ok(())
        );
        let now = UPLOAD_TTL_S + 1;
        let old = store.upload("a", "upload_old").unwrap().unwrap();
        assert_eq!(old.status(now), "expired");
        assert_eq!(
            store
                .add_part("a", &part("p2", "upload_old", 2), now)
                .unwrap(),
            Err(Refused::NotPending("expired".into()))
        );
        assert_eq!(sweep(&store, &dir, now).unwrap(), 2);
        assert!(!parts_dir(&dir, "upload_old").exists());
        assert!(!parts_dir(&dir, "upload_gone").exists());
        assert!(parts_dir(&dir, "upload_new").exists());
        assert!(store.parts("upload_old").unwrap().is_empty());
        assert_eq!(
            store.upload("a", "upload_old").unwrap().unwrap().status,
            "expired"
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
