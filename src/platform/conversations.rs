//! Conversations of the Responses API (`/v1/conversations`): a list of items (messages, function
//! calls and their outputs, as the Responses API shapes them) that a response given
//! `conversation` reads as its history and adds its own input and output to. Each belongs to the
//! project that created it; another project's id reads as unknown.

use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::Value;

use super::store::{Store, StoreError};

/// What adding items to a conversation did.
#[derive(Debug, PartialEq)]
pub enum Added {
    Done,
    NoConversation,
    /// Nothing was added: an item's id is the conversation's already, or repeats in the items.
    Duplicate(String),
}

/// The first id of `items` that `taken` has or that an earlier item has.
pub fn repeated_id(items: &[Value], mut taken: impl FnMut(&str) -> bool) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    items
        .iter()
        .filter_map(|i| i["id"].as_str())
        .find(|&id| !seen.insert(id) || taken(id))
}

/// A conversation without its items.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub id: String,
    pub created_at: i64,
    pub metadata: Value,
}

fn parse(id: &str, text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Invalid(format!("stored conversation {id} does not parse: {e}")))
}

/// Whether `project` has the conversation `id`.
fn owns(tx: &Transaction<'_>, project: &str, id: &str) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT 1 FROM conversations WHERE id = ?1 AND project = ?2",
        params![id, project],
        |_| Ok(()),
    )
    .optional()
    .map(|r| r.is_some())
}

fn append(tx: &Transaction<'_>, id: &str, items: &[Value]) -> rusqlite::Result<()> {
    let mut insert =
        tx.prepare("INSERT INTO conversation_items (conversation, id, item) VALUES (?1, ?2, ?3)")?;
    for item in items {
        let item_id = item["id"].as_str().unwrap_or_default();
        insert.execute(params![id, item_id, item.to_string()])?;
    }
    Ok(())
}

impl Store {
    /// Creates a conversation of `project` holding `items` (each with its `id`).
    pub fn create_conversation(
        &self,
        project: &str,
        conversation: &Conversation,
        items: &[Value],
    ) -> Result<(), StoreError> {
        let metadata = conversation.metadata.to_string();
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO conversations (id, project, created_at, metadata)
                 VALUES (?1, ?2, ?3, ?4)",
                params![conversation.id, project, conversation.created_at, metadata],
            )?;
            append(&tx, &conversation.id, items)?;
            tx.commit()
        })
    }

    pub fn conversation(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        let row = self.with(|c| {
            c.query_row(
                "SELECT created_at, metadata FROM conversations WHERE id = ?1 AND project = ?2",
                params![id, project],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
        })?;
        row.map(|(created_at, metadata)| {
            Ok(Conversation {
                id: id.to_string(),
                created_at,
                metadata: parse(id, &metadata)?,
            })
        })
        .transpose()
    }

    /// Replaces a conversation's metadata; whether `project` has it.
    pub fn set_conversation_metadata(
        &self,
        project: &str,
        id: &str,
        metadata: &Value,
    ) -> Result<bool, StoreError> {
        let metadata = metadata.to_string();
        self.with(|c| {
            c.execute(
                "UPDATE conversations SET metadata = ?3 WHERE id = ?1 AND project = ?2",
                params![id, project, metadata],
            )
        })
        .map(|n| n > 0)
    }

    /// Deletes a conversation and its items; whether `project` had it.
    pub fn delete_conversation(&self, project: &str, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if !owns(&tx, project, id)? {
                return Ok(false);
            }
            tx.execute(
                "DELETE FROM conversation_items WHERE conversation = ?1",
                params![id],
            )?;
            tx.execute("DELETE FROM conversations WHERE id = ?1", params![id])?;
            tx.commit().map(|()| true)
        })
    }

    /// Adds `items` at the end of a conversation of `project`, unless an id would repeat.
    pub fn add_conversation_items(
        &self,
        project: &str,
        id: &str,
        items: &[Value],
    ) -> Result<Added, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if !owns(&tx, project, id)? {
                return Ok(Added::NoConversation);
            }
            let mut exists =
                tx.prepare("SELECT 1 FROM conversation_items WHERE conversation = ?1 AND id = ?2")?;
            let mut taken = std::collections::HashSet::new();
            for item in items.iter().filter_map(|i| i["id"].as_str()) {
                if exists.exists(params![id, item])? {
                    taken.insert(item);
                }
            }
            drop(exists);
            if let Some(dup) = repeated_id(items, |item| taken.contains(item)) {
                return Ok(Added::Duplicate(dup.to_string()));
            }
            append(&tx, id, items)?;
            tx.commit().map(|()| Added::Done)
        })
    }

    /// A conversation's items, oldest first; `None` if `project` has no such conversation.
    pub fn conversation_items(
        &self,
        project: &str,
        id: &str,
    ) -> Result<Option<Vec<Value>>, StoreError> {
        let rows = self.with(|c| {
            let tx = c.transaction()?;
            if !owns(&tx, project, id)? {
                return Ok(None);
            }
            let mut select = tx.prepare(
                "SELECT item FROM conversation_items WHERE conversation = ?1 ORDER BY seq",
            )?;
            let rows = select
                .query_map(params![id], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Some(rows))
        })?;
        rows.map(|rows| rows.iter().map(|text| parse(id, text)).collect())
            .transpose()
    }

    /// Deletes item `item` of a conversation; whether `project` had it.
    pub fn delete_conversation_item(
        &self,
        project: &str,
        id: &str,
        item: &str,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if !owns(&tx, project, id)? {
                return Ok(false);
            }
            let n = tx.execute(
                "DELETE FROM conversation_items WHERE conversation = ?1 AND id = ?2",
                params![id, item],
            )?;
            tx.commit().map(|()| n > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_conversation_keeps_its_items_in_order_for_its_project_only() {
        let dir = std::env::temp_dir().join(format!("candela-conv-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        let conversation = Conversation {
            id: "conv_1".into(),
            created_at: 7,
            metadata: json!({"topic": "x"}),
        };
        let item = |id: &str| json!({"id": id, "type": "message"});
        store
            .create_conversation("a", &conversation, &[item("msg_1"), item("msg_2")])
            .unwrap();
        assert_eq!(
            store.conversation("a", "conv_1").unwrap(),
            Some(conversation.clone())
        );
        assert_eq!(store.conversation("b", "conv_1").unwrap(), None);
        let add = |project: &str, items: &[Value]| {
            store
                .add_conversation_items(project, "conv_1", items)
                .unwrap()
        };
        assert_eq!(add("b", &[item("msg_x")]), Added::NoConversation);
        assert_eq!(add("a", &[item("msg_3")]), Added::Done);
        // An id is the conversation's once: nothing of a call that repeats one is added.
        assert_eq!(
            add("a", &[item("msg_4"), item("msg_2")]),
            Added::Duplicate("msg_2".into())
        );
        assert_eq!(
            add("a", &[item("msg_4"), item("msg_4")]),
            Added::Duplicate("msg_4".into())
        );
        let ids = |items: Vec<Value>| -> Vec<String> {
            items
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect()
        };
        let items = store.conversation_items("a", "conv_1").unwrap().unwrap();
        assert_eq!(ids(items), ["msg_1", "msg_2", "msg_3"]);
        assert_eq!(store.conversation_items("b", "conv_1").unwrap(), None);
        assert!(!store
            .delete_conversation_item("b", "conv_1", "msg_2")
            .unwrap());
        assert!(store
            .delete_conversation_item("a", "conv_1", "msg_2")
            .unwrap());
        assert!(!store
            .delete_conversation_item("a", "conv_1", "msg_2")
            .unwrap());
        let items = store.conversation_items("a", "conv_1").unwrap().unwrap();
        assert_eq!(ids(items), ["msg_1", "msg_3"]);
        let metadata = json!({"topic": "y"});
        assert!(!store
            .set_conversation_metadata("b", "conv_1", &metadata)
            .unwrap());
        assert!(store
            .set_conversation_metadata("a", "conv_1", &metadata)
            .unwrap());
        assert_eq!(
            store.conversation("a", "conv_1").unwrap().unwrap().metadata,
            metadata
        );
        assert!(!store.delete_conversation("b", "conv_1").unwrap());
        assert!(store.delete_conversation("a", "conv_1").unwrap());
        assert_eq!(store.conversation_items("a", "conv_1").unwrap(), None);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
