//! Stored responses of the Responses API (`store: true`, OpenAI's default): what
//! `GET /v1/responses/{id}`, its input items and `previous_response_id` read back. Each belongs to
//! the project that created it; another project's id reads as unknown. A background response is
//! stored when it is queued and again when it ends.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::store::{Store, StoreError};

/// One stored response.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResponse {
    pub id: String,
    pub project: String,
    pub created_at: i64,
    /// The response object as the API returned it.
    pub response: Value,
    /// The input items of this call (not of the responses it follows), as the API lists them.
    pub input_items: Vec<Value>,
    /// The whole conversation up to and including this response's output, as `{role, content}`
    /// messages (instructions excluded: they do not carry over to a follow-up).
    pub conversation: Vec<Value>,
}

impl Store {
    pub fn put_response(&self, r: &StoredResponse) -> Result<(), StoreError> {
        let response = r.response.to_string();
        let items = Value::from(r.input_items.clone()).to_string();
        let conversation = Value::from(r.conversation.clone()).to_string();
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO responses
                 (id, project, created_at, response, input_items, conversation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.id, r.project, r.created_at, response, items, conversation],
            )
            .map(drop)
        })
    }

    /// The response `id` if `project` created it.
    pub fn response(&self, project: &str, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        let row = self.with(|c| {
            c.query_row(
                "SELECT created_at, response, input_items, conversation FROM responses
                 WHERE id = ?1 AND project = ?2",
                params![id, project],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()
        })?;
        let Some((created_at, response, items, conversation)) = row else {
            return Ok(None);
        };
        let parse = |text: &str| {
            serde_json::from_str::<Value>(text).map_err(|e| {
                StoreError::Invalid(format!("stored response {id} does not parse: {e}"))
            })
        };
        let list = |v: Value| match v {
            Value::Array(items) => items,
            _ => Vec::new(),
        };
        Ok(Some(StoredResponse {
            id: id.to_string(),
            project: project.to_string(),
            created_at,
            response: parse(&response)?,
            input_items: list(parse(&items)?),
            conversation: list(parse(&conversation)?),
        }))
    }

    /// Replaces the object of the response `id` of `project` while its status is `status`;
    /// whether it did. (A background response moves on from `queued` this way without undoing
    /// an end stored meanwhile.)
    pub fn replace_response_in(
        &self,
        project: &str,
        id: &str,
        status: &str,
        response: &Value,
    ) -> Result<bool, StoreError> {
        let response = response.to_string();
        self.with(|c| {
            c.execute(
                "UPDATE responses SET response = ?4
                 WHERE id = ?1 AND project = ?2 AND json_extract(response, '$.status') = ?3",
                params![id, project, status, response],
            )
        })
        .map(|n| n > 0)
    }

    /// Stores a background response as queued, run by the server started as `boot`.
    pub fn queue_response(&self, r: &StoredResponse, boot: &str) -> Result<(), StoreError> {
        let response = r.response.to_string();
        let items = Value::from(r.input_items.clone()).to_string();
        let conversation = Value::from(r.conversation.clone()).to_string();
        // One transaction: a sweep never sees the response without its server.
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO background_owners (id, boot) VALUES (?1, ?2)",
                params![r.id, boot],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO responses
                 (id, project, created_at, response, input_items, conversation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.id, r.project, r.created_at, response, items, conversation],
            )?;
            tx.commit()
        })
    }

    /// Stores a background response's end, unless it has ended already (a server that took it
    /// for a stopped one's marked it failed) or was deleted meanwhile; whether it did.
    pub fn finish_response(&self, r: &StoredResponse) -> Result<bool, StoreError> {
        let response = r.response.to_string();
        let items = Value::from(r.input_items.clone()).to_string();
        let conversation = Value::from(r.conversation.clone()).to_string();
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE responses SET response = ?3, input_items = ?4, conversation = ?5
                 WHERE id = ?1 AND project = ?2
                   AND json_extract(response, '$.status') IN ('queued', 'in_progress')",
                params![r.id, r.project, response, items, conversation],
            )?;
            tx.execute("DELETE FROM background_owners WHERE id = ?1", params![r.id])?;
            tx.execute("DELETE FROM response_cancels WHERE id = ?1", params![r.id])?;
            tx.commit().map(|()| n > 0)
        })
    }

    /// The background responses still queued or running, with the server that runs each.
    pub fn unfinished_responses(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.with(|c| {
            let mut select = c.prepare(
                "SELECT r.id, COALESCE(o.boot, '') FROM responses r
                 LEFT JOIN background_owners o ON o.id = r.id
                 WHERE json_extract(r.response, '$.status') IN ('queued', 'in_progress')",
            )?;
            let rows = select.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Marks `failed`, with `message`, those of the responses `ids` still queued or running
    /// (their server stopped, or could not store their end); how many.
    pub fn fail_responses(&self, ids: &[String], message: &str) -> Result<usize, StoreError> {
        let error = serde_json::json!({"code": "server_error", "message": message}).to_string();
        self.with(|c| {
            let tx = c.transaction()?;
            let mut failed = 0;
            for id in ids {
                failed += tx.execute(
                    "UPDATE responses
                     SET response = json_set(response, '$.status', 'failed', '$.error', json(?2))
                     WHERE id = ?1
                       AND json_extract(response, '$.status') IN ('queued', 'in_progress')",
                    params![id, error],
                )?;
                tx.execute("DELETE FROM background_owners WHERE id = ?1", params![id])?;
                tx.execute("DELETE FROM response_cancels WHERE id = ?1", params![id])?;
            }
            tx.commit().map(|()| failed)
        })
    }

    /// Deletes the response `id` if `project` created it; whether there was one.
    pub fn delete_response(&self, project: &str, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "DELETE FROM responses WHERE id = ?1 AND project = ?2",
                params![id, project],
            )?;
            if n > 0 {
                tx.execute("DELETE FROM background_owners WHERE id = ?1", params![id])?;
                tx.execute("DELETE FROM response_cancels WHERE id = ?1", params![id])?;
            }
            tx.commit().map(|()| n > 0)
        })
    }

    /// Asks the server running the background response `id` of `project` to stop it (a cancel
    /// sent to another server on the same data directory); whether it is still running.
    pub fn request_cancel(&self, project: &str, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO response_cancels (id)
                 SELECT id FROM responses WHERE id = ?1 AND project = ?2
                   AND json_extract(response, '$.status') IN ('queued', 'in_progress')",
                params![id, project],
            )
        })
        .map(|n| n > 0)
    }

    /// Whether the background response `id` should go on: it is stored, has not ended (another
    /// server's sweep may have failed it), and no cancel was asked for it.
    pub fn run_wanted(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM responses WHERE id = ?1
                                  AND json_extract(response, '$.status') IN ('queued', 'in_progress'))
                    AND NOT EXISTS (SELECT 1 FROM response_cancels WHERE id = ?1)",
                params![id],
                |r| r.get(0),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cancel_asked_elsewhere_reaches_the_running_server() {
        let dir = std::env::temp_dir().join(format!("candela-resp-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        let queued = StoredResponse {
            id: "resp_2".into(),
            project: "a".into(),
            created_at: 7,
            response: json!({"id": "resp_2", "status": "queued"}),
            input_items: Vec::new(),
            conversation: Vec::new(),
        };
        store.queue_response(&queued, "boot-1").unwrap();
        assert!(store.run_wanted("resp_2").unwrap());
        // Another project's cancel is no cancel.
        assert!(!store.request_cancel("b", "resp_2").unwrap());
        assert!(store.run_wanted("resp_2").unwrap());
        assert!(store.request_cancel("a", "resp_2").unwrap());
        assert!(!store.run_wanted("resp_2").unwrap());
        // Its end clears the request; an ended response takes none.
        let done = StoredResponse {
            response: json!({"id": "resp_2", "status": "cancelled"}),
            ..queued.clone()
        };
        assert!(store.finish_response(&done).unwrap());
        let cancels = |s: &Store| {
            s.with(|c| {
                c.query_row("SELECT COUNT(*) FROM response_cancels", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap()
        };
        assert_eq!(cancels(&store), 0);
        assert!(!store.request_cancel("a", "resp_2").unwrap());
        // An ended response goes on no more (another server's sweep may have failed it).
        assert!(!store.run_wanted("resp_2").unwrap());
        assert_eq!(
            store
                .fail_responses(&["resp_2".to_string()], "gone")
                .unwrap(),
            0
        );
        // A deleted response is not wanted either.
        assert!(store.delete_response("a", "resp_2").unwrap());
        assert!(!store.run_wanted("resp_2").unwrap());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_response_is_read_and_deleted_by_its_project_only() {
        let dir = std::env::temp_dir().join(format!("candela-resp-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        let r = StoredResponse {
            id: "resp_1".into(),
            project: "a".into(),
            created_at: 7,
            response: json!({"id": "resp_1", "output": []}),
            input_items: vec![json!({"id": "msg_1", "type": "message"})],
            conversation: vec![json!({"role": "user", "content": "hi"})],
        };
        store.put_response(&r).unwrap();
        assert_eq!(store.response("a", "resp_1").unwrap(), Some(r.clone()));
        assert_eq!(store.response("b", "resp_1").unwrap(), None);
        assert!(!store.delete_response("b", "resp_1").unwrap());
        assert!(store.delete_response("a", "resp_1").unwrap());
        assert_eq!(store.response("a", "resp_1").unwrap(), None);
        assert!(!store.delete_response("a", "resp_1").unwrap());

        // A background response moves on only from the status it is in; its end is stored
        // only while it has not ended, and one whose server stopped ends failed.
        let queued = StoredResponse {
            response: json!({"id": "resp_1", "status": "queued"}),
            ..r.clone()
        };
        store.queue_response(&queued, "boot-1").unwrap();
        let running = json!({"id": "resp_1", "status": "in_progress"});
        assert!(!store
            .replace_response_in("b", "resp_1", "queued", &running)
            .unwrap());
        assert!(store
            .replace_response_in("a", "resp_1", "queued", &running)
            .unwrap());
        assert!(!store
            .replace_response_in("a", "resp_1", "queued", &running)
            .unwrap());
        let unfinished = store.unfinished_responses().unwrap();
        assert_eq!(unfinished, [("resp_1".to_string(), "boot-1".to_string())]);
        let ids = ["resp_1".to_string()];
        assert_eq!(store.fail_responses(&ids, "gone").unwrap(), 1);
        let failed = store.response("a", "resp_1").unwrap().unwrap().response;
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["error"]["message"], "gone");
        assert_eq!(store.fail_responses(&ids, "gone").unwrap(), 0);
        assert!(store.unfinished_responses().unwrap().is_empty());
        let done = StoredResponse {
            response: json!({"id": "resp_1", "status": "completed"}),
            ..r.clone()
        };
        assert!(!store.finish_response(&done).unwrap());
        store.queue_response(&queued, "boot-1").unwrap();
        assert!(store.finish_response(&done).unwrap());
        assert_eq!(
            store.response("a", "resp_1").unwrap().unwrap().response["status"],
            "completed"
        );
        assert!(store.delete_response("a", "resp_1").unwrap());
        assert!(!store.finish_response(&done).unwrap());
        assert_eq!(store.response("a", "resp_1").unwrap(), None);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
