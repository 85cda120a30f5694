//! Files of the Files API: uploads (the input of batches) and the output of batches. Their
//! records live in the database, their bytes under `DATA_DIR/files/ID`, written whole to a
//! temporary file and renamed into place only once flushed to disk, so that a file the API has
//! listed is never a partial one. Each belongs to the project that uploaded it.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};

use super::store::{Store, StoreError};

/// The purposes OpenAI's Files API takes, and the one batch outputs get.
pub const UPLOAD_PURPOSES: [&str; 6] = [
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];
pub const BATCH_OUTPUT: &str = "batch_output";

#[derive(Clone, Debug, PartialEq)]
pub struct FileRecord {
    pub id: String,
    pub project: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    pub created_at: i64,
}

impl FileRecord {
    /// The file object of the API.
    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": null,
            "status_details": null,
        })
    }
}

/// Where file bytes live.
pub fn files_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("files")
}

/// A file being written: bytes go to `ID.part`, which [`NewFile::keep`] flushes and renames.
/// Dropped before that, it removes the partial file.
pub struct NewFile {
    pub id: String,
    part: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
    pub bytes: u64,
}

impl NewFile {
    /// A new file of the Files API, with a new id.
    pub fn create(data_dir: &Path) -> std::io::Result<Self> {
        let id = format!("file-{}", uuid::Uuid::new_v4().simple());
        Self::create_in(&files_dir(data_dir), id)
    }

    /// A new file `dir/id` (an upload's part, say).
    pub fn create_in(dir: &Path, id: String) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let part = dir.join(format!("{id}.part"));
        let out = std::io::BufWriter::new(std::fs::File::create(&part)?);
        Ok(Self {
            id,
            part,
            out: Some(out),
            bytes: 0,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if let Some(out) = &mut self.out {
            out.write_all(data)?;
            self.bytes += data.len() as u64;
        }
        Ok(())
    }

    /// Flushes the bytes to disk and moves them into place; returns the final path.
    pub fn keep(mut self) -> std::io::Result<PathBuf> {
        let out = self.out.take().expect("a file is kept once");
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let path = self.part.with_extension("");
        std::fs::rename(&self.part, &path)?;
        Ok(path)
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

/// Removes the partial files a server killed mid-write left behind (those last written before
/// `before`, this server's start); returns how many. Run by the server that owns the data
/// directory (see `api::batches::resume`).
pub fn sweep_partial(data_dir: &Path, before: std::time::SystemTime) -> std::io::Result<usize> {
    let dir = files_dir(data_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let stale = entry.metadata()?.modified()? < before;
        if stale && path.extension().is_some_and(|e| e == "part") {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn record(r: &rusqlite::Row) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: r.get(0)?,
        project: r.get(1)?,
        filename: r.get(2)?,
        purpose: r.get(3)?,
        bytes: r.get::<_, i64>(4)? as u64,
        created_at: r.get(5)?,
    })
}

impl Store {
    pub fn insert_file(&self, f: &FileRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO files (id, project, filename, purpose, bytes, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    f.id,
                    f.project,
                    f.filename,
                    f.purpose,
                    f.bytes as i64,
                    f.created_at
                ],
            )
            .map(drop)
        })
    }

    /// The file `id` if `project` owns it.
    pub fn file(&self, project: &str, id: &str) -> Result<Option<FileRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, project, filename, purpose, bytes, created_at FROM files
                 WHERE id = ?1 AND project = ?2",
                params![id, project],
                record,
            )
            .optional()
        })
    }

    /// A project's files, oldest first, of one purpose if given.
    pub fn files(
        &self,
        project: &str,
        purpose: Option<&str>,
    ) -> Result<Vec<FileRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, project, filename, purpose, bytes, created_at FROM files
                 WHERE project = ?1 AND (?2 IS NULL OR purpose = ?2) ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![project, purpose], record)?;
            rows.collect()
        })
    }

    /// Forgets the file `id` if `project` owns it; whether it did. The caller removes the bytes.
    pub fn delete_file(&self, project: &str, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM files WHERE id = ?1 AND project = ?2",
                params![id, project],
            )
        })
        .map(|n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_written_whole_and_kept_to_its_project() {
        let dir = std::env::temp_dir().join(format!("candela-files-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        // Dropped before `keep`: nothing is left behind.
        let mut dropped = NewFile::create(&dir).unwrap();
        dropped.write(b"partial").unwrap();
        drop(dropped);
        assert_eq!(std::fs::read_dir(files_dir(&dir)).unwrap().count(), 0);

        let mut f = NewFile::create(&dir).unwrap();
        f.write(b"{\"a\": 1}\n").unwrap();
        f.write(b"{\"a\": 2}\n").unwrap();
        let (id, bytes) = (f.id.clone(), f.bytes);
        let path = f.keep().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\": 1}\n{\"a\": 2}\n");
        let rec = FileRecord {
            id: id.clone(),
            project: "a".into(),
            filename: "in.jsonl".into(),
            purpose: "batch".into(),
            bytes,
            created_at: 1,
        };
        store.insert_file(&rec).unwrap();
        assert_eq!(store.file("a", &id).unwrap(), Some(rec.clone()));
        assert_eq!(store.file("b", &id).unwrap(), None);
        assert_eq!(store.files("a", Some("batch")).unwrap(), vec![rec]);
        assert!(store.files("a", Some("user_data")).unwrap().is_empty());
        assert!(store.files("b", None).unwrap().is_empty());
        assert!(!store.delete_file("b", &id).unwrap());
        assert!(store.delete_file("a", &id).unwrap());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_sweep_removes_stale_partial_files_only() {
        let dir = std::env::temp_dir().join(format!("candela-sweep-{}", uuid::Uuid::new_v4()));
        let files = files_dir(&dir);
        std::fs::create_dir_all(&files).unwrap();
        let minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let stale = files.join("file-old.part");
        std::fs::write(&stale, b"cut").unwrap();
        let old = std::fs::File::options().write(true).open(&stale).unwrap();
        old.set_modified(minute_ago).unwrap();
        std::fs::write(files.join("file-kept"), b"{}").unwrap();
        let started = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
        // A file written since (an upload under way) stays.
        let mut writing = NewFile::create(&dir).unwrap();
        writing.write(b"half").unwrap();
        assert_eq!(sweep_partial(&dir, started).unwrap(), 1);
        assert!(!stale.exists());
        assert!(files.join("file-kept").exists());
        assert_eq!(std::fs::read(writing.keep().unwrap()).unwrap(), b"half");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
