//! Relevance from an embedding model, as vLLM serves it: `POST /v1/rerank` (also `/rerank` and
//! `/v2/rerank`; Jina's and Cohere's shape: a `query`, `documents`, `top_n`) ranks documents by
//! the cosine similarity of their embeddings to the query's, and `POST /v1/score` (also
//! `/score`) gives the similarity of each pair of `text_1` and `text_2` (one against many, or
//! pairwise). Metered and rate limited as embeddings.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::embeddings::embedding_model;
use super::{json, ApiError, AppState};
use crate::platform::usage::Meter;
use crate::serving::EmbeddingModel;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Document {
    Text(String),
    Object { text: String },
}

#[derive(Deserialize)]
pub struct RerankBody {
    model: String,
    query: String,
    documents: Vec<Document>,
    top_n: Option<usize>,
    /// Whether each result carries its document (default true).
    return_documents: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Texts {
    One(String),
    Many(Vec<String>),
}

impl Texts {
    fn into_vec(self) -> Vec<String> {
        match self {
            Texts::One(t) => vec![t],
            Texts::Many(ts) => ts,
        }
    }
}

#[derive(Deserialize)]
pub struct ScoreBody {
    model: String,
    text_1: Texts,
    text_2: Texts,
}

/// The embeddings of `texts` (each named by `field` in errors) and their tokens in all.
async fn embed(
    model: &EmbeddingModel,
    texts: Vec<String>,
    field: impl Fn(usize) -> String,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let mut tokens = Vec::with_capacity(texts.len());
    for (i, text) in texts.into_iter().enumerate() {
        let named = |e| {
            let mut e = ApiError::from(e);
            let name = field(i);
            e.message = e.message.replace("input[0]", &name);
            e.param = Some(name);
            e
        };
        if text.is_empty() {
            return Err(named(crate::serving::ServingError::invalid(
                "input",
                "input[0] is an empty string; texts must not be empty.",
            )));
        }
        let ids = model.tokenize(&[text]).map_err(named)?;
        model.check_ids(&ids).map_err(named)?;
        tokens.extend(ids);
    }
    let (count, total) = (tokens.len(), tokens.iter().map(Vec::len).sum());
    let vectors = model.embed(tokens).await?;
    if vectors.len() != count {
        return Err(super::files::server_error(
            "embed every text",
            format!("{} embeddings for {count} texts", vectors.len()),
        ));
    }
    Ok((vectors, total))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE);
    // A broken vector ranks last rather than writing a NaN no JSON holds.
    if cos.is_nan() {
        -1.0
    } else {
        cos
    }
}

/// At most `limit` texts a call, as `/v1/embeddings` takes.
fn check_count(field: &str, count: usize, limit: usize) -> Result<(), ApiError> {
    if count == 0 || count > limit {
        return Err(ApiError::invalid(
            Some(field),
            format!("'{field}' must hold between 1 and {limit} texts; got {count}."),
        ));
    }
    Ok(())
}

pub async fn rerank(
    State(state): State<Arc<AppState>>,
    meter: Option<Extension<Arc<Meter>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let meter = meter.map(|Extension(m)| m);
    let req: RerankBody = json::parse(body)?;
    let model = embedding_model(&state, &req.model, meter.as_deref())?;
    let limit = state.platform.config.max_embedding_inputs;
    check_count("documents", req.documents.len(), limit)?;
    let documents: Vec<String> = req
        .documents
        .into_iter()
        .map(|d| match d {
            Document::Text(t) | Document::Object { text: t } => t,
        })
        .collect();
    let texts = std::iter::once(req.query)
        .chain(documents.iter().cloned())
        .collect();
    let field = |i: usize| match i {
        0 => "query".to_string(),
        i => format!("documents[{}]", i - 1),
    };
    let (vectors, tokens) = embed(&model, texts, field).await?;
    if let Some(m) = &meter {
        m.set_tokens(tokens as u64, 0);
    }
    let mut ranked: Vec<(usize, f32)> = vectors[1..]
        .iter()
        .enumerate()
        .map(|(i, v)| (i, cosine(&vectors[0], v)))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    // `top_n` 0 (or none) means all, as vLLM takes it.
    ranked.truncate(req.top_n.filter(|&n| n > 0).unwrap_or(ranked.len()));
    let with_documents = req.return_documents.unwrap_or(true);
    let results: Vec<Value> = ranked
        .into_iter()
        .map(|(index, score)| {
            let mut r = json!({"index": index, "relevance_score": score});
            if with_documents {
                r["document"] = json!({"text": documents[index]});
            }
            r
        })
        .collect();
    Ok(Json(json!({
        "id": format!("rerank-{}", uuid::Uuid::new_v4().simple()),
        "model": model.info.id,
        "usage": {"total_tokens": tokens},
        "results": results,
    })))
}

pub async fn score(
    State(state): State<Arc<AppState>>,
    meter: Option<Extension<Arc<Meter>>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let meter = meter.map(|Extension(m)| m);
    let req: ScoreBody = json::parse(body)?;
    let model = embedding_model(&state, &req.model, meter.as_deref())?;
    let (first, second) = (req.text_1.into_vec(), req.text_2.into_vec());
    let limit = state.platform.config.max_embedding_inputs;
    check_count("text_1", first.len(), limit)?;
    check_count("text_2", second.len(), limit)?;
    if first.len() != 1 && first.len() != second.len() {
        return Err(ApiError::invalid(
            Some("text_1"),
            format!(
                "'text_1' holds {} texts and 'text_2' {}: give one text_1 to score against \
                 every text_2, or as many as text_2 to score in pairs.",
                first.len(),
                second.len()
            ),
        ));
    }
    let split = first.len();
    let field = |i: usize| match i < split {
        true if split == 1 => "text_1".to_string(),
        true => format!("text_1[{i}]"),
        false => format!("text_2[{}]", i - split),
    };
    let texts = first.into_iter().chain(second).collect();
    let (vectors, tokens) = embed(&model, texts, field).await?;
    if let Some(m) = &meter {
        m.set_tokens(tokens as u64, 0);
    }
    let (left, right) = vectors.split_at(split);
    let data: Vec<Value> = right
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let score = cosine(&left[if split == 1 { 0 } else { i }], v);
            json!({"index": i, "object": "score", "score": score})
        })
        .collect();
    Ok(Json(json!({
        "id": format!("score-{}", uuid::Uuid::new_v4().simple()),
        "object": "list",
        "created": super::responses::now(),
        "model": model.info.id,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

#[cfg(test)]
mod tests {
    use super::cosine;

    #[test]
    fn cosine_is_the_angle_not_the_length() {
        assert!((cosine(&[1.0, 0.0], &[3.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-6);
        assert!((cosine(&[1.0, 1.0], &[-1.0, -1.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
