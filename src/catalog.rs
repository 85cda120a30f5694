//! The model catalog: which models exist, where their weights come from, and the metadata that
//! `/v1/models` shows.

use serde::Deserialize;

/// The catalog compiled into the binary (`models/catalog.toml`).
pub const DEFAULT_CATALOG: &str = include_str!("../models/catalog.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub sha256: Option<String>,
    /// Path of the weights inside a package source.
    pub file: Option<String>,
    #[serde(default)]
    pub owned_by: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub context_size: Option<usize>,
    pub max_tokens: Option<usize>,
    pub input_cost: Option<f64>,
    pub output_cost: Option<f64>,
    pub endpoint_publication_date: Option<String>,
    pub license: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CatalogFile {
    model: Vec<CatalogEntry>,
}

#[derive(Debug, thiserror::Error)]
#[error("catalog: {0}")]
pub struct CatalogError(String);

pub struct Catalog {
    pub entries: Vec<CatalogEntry>,
}

impl Catalog {
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| CatalogError(e.to_string()))?;
        Ok(Self {
            entries: file.model,
        })
    }

    pub fn builtin() -> Self {
        Self::parse(DEFAULT_CATALOG).expect("the built-in catalog parses (checked by a test)")
    }

    pub fn get(&self, id: &str) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    pub fn ids(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.id.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_has_a_chat_and_an_embedding_model() {
        let c = Catalog::builtin();
        assert_eq!(c.get("smollm2-135m-instruct").unwrap().kind, "chat");
        assert_eq!(c.get("all-minilm-l6-v2").unwrap().kind, "embedding");
    }
}
