//! OpenAI's cursor pagination for lists (`limit`, `order`, `after`), and its list object
//! (`data`, `first_id`, `last_id`, `has_more`).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::ApiError;

pub struct Page {
    pub limit: usize,
    /// `order=asc`; lists are newest first by default.
    pub ascending: bool,
    pub after: Option<String>,
}

impl Page {
    pub fn from_query(
        query: &HashMap<String, String>,
        default_limit: usize,
        max_limit: usize,
    ) -> Result<Self, ApiError> {
        let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
            None => default_limit,
            Some(Ok(l)) if (1..=max_limit).contains(&l) => l,
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("limit"),
                    format!(
                    "Invalid value for 'limit': it must be an integer between 1 and {max_limit}."
                ),
                ))
            }
        };
        let ascending = match query.get("order").map(String::as_str) {
            None | Some("desc") => false,
            Some("asc") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("order"),
                    format!("Invalid value for 'order': '{other}'; expected 'asc' or 'desc'."),
                ))
            }
        };
        Ok(Self {
            limit,
            ascending,
            after: query.get("after").cloned(),
        })
    }

    /// As [`Page::from_query`], for lists that are oldest first unless `order=desc` says
    /// otherwise (OpenAI's lists of a stored completion and its messages).
    pub fn from_query_oldest_first(
        query: &HashMap<String, String>,
        default_limit: usize,
        max_limit: usize,
    ) -> Result<Self, ApiError> {
        let page = Self::from_query(query, default_limit, max_limit)?;
        Ok(Self {
            ascending: query.get("order").is_none_or(|o| o == "asc"),
            ..page
        })
    }

    /// The page of `objects`, given oldest first, in the order asked for.
    pub fn list_oldest_first(&self, mut objects: Vec<Value>) -> Result<Value, ApiError> {
        if !self.ascending {
            objects.reverse();
        }
        self.list(objects)
    }

    /// The page of `objects` (in the order asked for) that follows `after`, as a list object.
    pub fn list(&self, mut objects: Vec<Value>) -> Result<Value, ApiError> {
        if let Some(after) = &self.after {
            let Some(at) = objects.iter().position(|o| o["id"].as_str() == Some(after)) else {
                return Err(ApiError::invalid(
                    Some("after"),
                    format!("Invalid value for 'after': no object '{after}' in this list."),
                ));
            };
            objects.drain(..=at);
        }
        let has_more = objects.len() > self.limit;
        objects.truncate(self.limit);
        Ok(json!({
            "object": "list",
            "data": objects,
            "first_id": objects.first().map(|o| o["id"].clone()),
            "last_id": objects.last().map(|o| o["id"].clone()),
            "has_more": has_more,
        }))
    }
}
