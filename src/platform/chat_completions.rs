//! Stored chat completions (`store: true` on `POST /v1/chat/completions`): the completion as the
//! API returned it and the messages it answered, read back, listed, given new metadata and
//! deleted through `/v1/chat/completions/{id}`. Each belongs to the project that created it;
//! another project's id reads as unknown.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::store::{Store, StoreError};

/// One stored chat completion.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCompletion {
    pub id: String,
    pub created_at: i64,
    /// The `chat.completion` object (its `metadata` kept current).
    pub completion: Value,
    /// The request's messages, each with its `id`.
    pub messages: Vec<Value>,
}

fn parse(id: &str, text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::Invalid(format!("stored chat completion {id} does not parse: {e}"))
    })
}

impl Store {
    pub fn put_chat_completion(
        &self,
        project: &str,
        c: &StoredCompletion,
    ) -> Result<(), StoreError> {
        let completion = c.completion.to_string();
        let messages = Value::from(c.messages.clone()).to_string();
        self.with(|conn| {
            conn.execute(
                "INSERT INTO chat_completions (id, project, created_at, completion, messages)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![c.id, project, c.created_at, completion, messages],
            )
            .map(drop)
        })
    }

    pub fn chat_completion(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<StoredCompletion>, StoreError> {
        let row = self.with(|c| {
            c.query_row(
                "SELECT created_at, completion, messages FROM chat_completions
                 WHERE id = ?1 AND project = ?2",
                params![id, project],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
        })?;
        let Some((created_at, completion, messages)) = row else {
            return Ok(None);
        };
        let messages = match parse(id, &messages)? {
            Value::Array(list) => list,
            _ => Vec::new(),
        };
        Ok(Some(StoredCompletion {
            id: id.to_string(),
            created_at,
            completion: parse(id, &completion)?,
            messages,
        }))
    }

    /// The project's stored completions (without their messages), oldest first.
    pub fn chat_completions(&self, project: &str) -> Result<Vec<Value>, StoreError> {
        let rows = self.with(|c| {
            let mut select = c.prepare(
                "SELECT id, completion FROM chat_completions WHERE project = ?1
                 ORDER BY created_at, rowid",
            )?;
            let rows = select
                .query_map(params![project], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.iter().map(|(id, text)| parse(id, text)).collect()
    }

    /// Replaces a stored completion's metadata; the completion, if `project` has it.
    pub fn set_chat_completion_metadata(
        &self,
        project: &str,
        id: &str,
        metadata: &Value,
    ) -> Result<Option<Value>, StoreError> {
        let metadata = metadata.to_string();
        self.with(|c| {
            c.execute(
                "UPDATE chat_completions SET completion = json_set(completion, '$.metadata', json(?3))
                 WHERE id = ?1 AND project = ?2",
                params![id, project, metadata],
            )
        })?;
        Ok(self.chat_completion(project, id)?.map(|c| c.completion))
    }

    /// Deletes a stored completion; whether `project` had it.
    pub fn delete_chat_completion(&self, project: &str, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM chat_completions WHERE id = ?1 AND project = ?2",
                params![id, project],
            )
        })
        .map(|n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_completion_is_read_listed_updated_and_deleted_by_its_project_only() {
        let dir = std::env::temp_dir().join(format!("candela-chat-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        let stored = |id: &str, at: i64| StoredCompletion {
            id: id.into(),
            created_at: at,
            completion: json!({"id": id, "metadata": {}}),
            messages: vec![json!({"id": format!("{id}-0"), "role": "user", "content": "hi"})],
        };
        store.put_chat_completion("a", &stored("c2", 2)).unwrap();
        store.put_chat_completion("a", &stored("c1", 1)).unwrap();
        store.put_chat_completion("b", &stored("c3", 3)).unwrap();
        assert_eq!(
            store.chat_completion("a", "c1").unwrap(),
            Some(stored("c1", 1))
        );
        assert_eq!(store.chat_completion("b", "c1").unwrap(), None);
        let ids: Vec<Value> = store
            .chat_completions("a")
            .unwrap()
            .iter()
            .map(|c| c["id"].clone())
            .collect();
        assert_eq!(ids, [json!("c1"), json!("c2")]);
        let metadata = json!({"k": "v"});
        assert_eq!(
            store
                .set_chat_completion_metadata("b", "c1", &metadata)
                .unwrap(),
            None
        );
        let updated = store
            .set_chat_completion_metadata("a", "c1", &metadata)
            .unwrap();
        assert_eq!(updated.unwrap()["metadata"], metadata);
        assert!(!store.delete_chat_completion("b", "c1").unwrap());
        assert!(store.delete_chat_completion("a", "c1").unwrap());
        assert_eq!(store.chat_completion("a", "c1").unwrap(), None);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
