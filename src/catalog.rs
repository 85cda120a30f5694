//! The model catalog: which models exist, where their weights come from, and the metadata that
//! `/v1/models` shows and virtual models rank on. The built-in one is `models/catalog.toml`;
//! `candela serve --catalog FILE` reads another. Every value is checked while parsing, so a bad
//! entry is an error naming the file, the line and the field.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::platform::query::is_tag_char;

/// The catalog compiled into the binary (`models/catalog.toml`).
pub const DEFAULT_CATALOG: &str = include_str!("../models/catalog.toml");

/// What a model serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// Chat and legacy completions.
    Chat,
    /// Legacy completions (a base model; chat works when its GGUF carries a chat template).
    Completion,
    Embedding,
    /// Not servable yet: an entry of this type is skipped with a warning.
    Vision,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    #[serde(deserialize_with = "id")]
    pub id: String,
    /// `None` for a model given by path, whose type its files tell.
    #[serde(rename = "type")]
    pub kind: Option<ModelType>,
    pub source: String,
    pub sha256: Option<String>,
    /// Path of the weights inside a package source.
    pub file: Option<String>,
    #[serde(default)]
    pub owned_by: Option<String>,
    #[serde(default, deserialize_with = "tags")]
    pub tags: Vec<String>,
    /// Parameter count, when the catalog should state it (else counted from the weights).
    #[serde(default, deserialize_with = "count")]
    pub params: Option<u64>,
    #[serde(default, deserialize_with = "positive")]
    pub context_size: Option<usize>,
    /// Most completion tokens per request.
    #[serde(default, deserialize_with = "positive")]
    pub max_tokens: Option<usize>,
    /// EUR per million tokens.
    #[serde(default, deserialize_with = "price")]
    pub input_cost: Option<f64>,
    #[serde(default, deserialize_with = "price")]
    pub output_cost: Option<f64>,
    #[serde(default, deserialize_with = "date")]
    pub endpoint_publication_date: Option<String>,
    pub license: Option<String>,
}

impl CatalogEntry {
    /// An entry for a model given by path (`--model ./x.gguf`): metadata from its files only.
    pub fn local(id: String, source: String) -> Self {
        Self {
            id,
            kind: None,
            source,
            sha256: None,
            file: None,
            owned_by: Some("local".into()),
            tags: Vec::new(),
            params: None,
            context_size: None,
            max_tokens: None,
            input_cost: None,
            output_cost: None,
            endpoint_publication_date: None,
            license: None,
        }
    }
}

fn id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let ok = !s.is_empty() && s.len() <= 128 && s.chars().all(is_tag_char);
    if ok {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "invalid id `{s}`: use letters, digits and - _ . : / (no @ or ?, which start virtual-model queries)"
        )))
    }
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let v = i64::deserialize(d)?;
    usize::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid value {v}: must be a positive number of tokens"
            ))
        })
}

fn tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let tags = Vec::<String>::deserialize(d)?;
    match tags
        .iter()
        .find(|t| t.is_empty() || !t.chars().all(is_tag_char))
    {
        Some(bad) => Err(serde::de::Error::custom(format!(
            "invalid tag `{bad}`: use letters, digits and - _ . : / (a query names tags by these)"
        ))),
        None => Ok(tags),
    }
}

fn price<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let v = f64::deserialize(d)?;
    if v.is_finite() && v >= 0.0 {
        Ok(Some(v))
    } else {
        Err(serde::de::Error::custom(format!(
            "invalid price {v}: a cost in EUR per million tokens is a number >= 0"
        )))
    }
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    // `135e6` reads better than 135000000 and TOML makes it a float.
    let v = f64::deserialize(d)?;
    if v.is_finite() && v >= 1.0 && v.fract() == 0.0 {
        Ok(Some(v as u64))
    } else {
        Err(serde::de::Error::custom(format!(
            "invalid params {v}: a parameter count is a positive whole number"
        )))
    }
}

fn date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    chrono::NaiveDate::parse_from_str(&s, "%Y-%m-%d")
        .map(|_| Some(s.clone()))
        .map_err(|e| serde::de::Error::custom(format!("invalid date `{s}` ({e}): use YYYY-MM-DD")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    model: Vec<CatalogEntry>,
}

#[derive(Debug, thiserror::Error)]
#[error("catalog {origin}: {message}")]
pub struct CatalogError {
    origin: String,
    message: String,
}

pub struct Catalog {
    pub entries: Vec<CatalogEntry>,
}

impl Catalog {
    /// Parses catalog text; `origin` names it in errors (a file path).
    pub fn parse(text: &str, origin: &str) -> Result<Self, CatalogError> {
        let err = |message: String| CatalogError {
            origin: origin.to_string(),
            message,
        };
        // toml's message carries the line, the column and the offending field.
        let file: CatalogFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for e in &file.model {
            if !seen.insert(e.id.as_str()) {
                let line = text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| {
                        let l = l.trim_start();
                        l.starts_with("id") && l.contains(&format!("\"{}\"", e.id))
                    })
                    .nth(1)
                    .map_or(String::new(), |(i, _)| format!(" (line {})", i + 1));
                return Err(err(format!("two models have the id `{}`{line}", e.id)));
            }
        }
        Ok(Self {
            entries: file.model,
        })
    }

    pub fn builtin() -> Self {
        Self::parse(DEFAULT_CATALOG, "models/catalog.toml (built in)")
            .expect("the built-in catalog parses (checked by a test)")
    }

    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError {
            origin: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
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
        assert_eq!(
            c.get("smollm2-135m-instruct").unwrap().kind,
            Some(ModelType::Chat)
        );
        assert_eq!(
            c.get("all-minilm-l6-v2").unwrap().kind,
            Some(ModelType::Embedding)
        );
    }

    fn error_of(entry: &str) -> String {
        let text =
            format!("[[model]]\nid = \"m\"\ntype = \"chat\"\nsource = \"x.gguf\"\n{entry}\n");
        Catalog::parse(&text, "my.toml").err().unwrap().to_string()
    }

    #[test]
    fn bad_entries_name_the_file_the_line_and_the_field() {
        let cases = [
            ("input_cost = -1.0", "input_cost"),
            (
                "endpoint_publication_date = \"2024-13-01\"",
                "endpoint_publication_date",
            ),
            ("context_size = \"big\"", "context_size"),
            ("colour = \"red\"", "colour"),
            ("params = 1.5", "params"),
            ("context_size = 0", "context_size"),
            ("tags = [\"chat bot\"]", "tags"),
        ];
        for (entry, field) in cases {
            let e = error_of(entry);
            assert!(e.contains("my.toml"), "{e}");
            assert!(e.contains("line 5"), "{e}");
            assert!(e.contains(field), "{e}");
        }
        let e = Catalog::parse(
            "[[model]]\nid = \"m\"\ntype = \"robot\"\nsource = \"x\"\n",
            "c.toml",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("line 3") && e.contains("type") && e.contains("robot"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let one = "[[model]]\nid = \"m\"\nsource = \"x\"\n";
        let e = Catalog::parse(&format!("{one}{one}"), "c.toml")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("two models have the id `m`"), "{e}");
    }
}
