//! Structured output: JSON mode, JSON schemas and tool-call grammars, enforced token by token.
//!
//! A grammar (llguidance's JSON-schema compiler or a Lark grammar) becomes a [`TokenConstraint`]
//! that the engine applies to each row of logits: tokens that would leave the grammar are never
//! sampled, so the output parses whatever the model's size.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::ServingError;
use crate::ids::TokenId;
use crate::sampling::{Constraint, Progress, TokenConstraint};

/// What the output must match.
#[derive(Clone, Debug)]
pub enum Grammar {
    /// JSON valid against this schema (`{"type": "object"}` for JSON mode).
    JsonSchema(Value),
    /// A regular expression the whole output matches.
    Regex(String),
    /// A Lark grammar (a client's, or the server's own for tool calls).
    Lark(String),
}

/// A grammar and the request field it came from, for errors.
#[derive(Clone, Debug)]
pub struct OutputFormat {
    pub grammar: Grammar,
    pub param: String,
}

impl OutputFormat {
    pub fn json_object(param: &str) -> Self {
        Self::json_schema(json!({"type": "object"}), param)
    }

    pub fn json_schema(schema: Value, param: &str) -> Self {
        Self {
            grammar: Grammar::JsonSchema(schema),
            param: param.to_string(),
        }
    }
}

/// Layout the JSON compiler is told to use unless a schema says otherwise (`x-guidance`): one
/// space after `:` and `,` and nowhere else, as `json.dumps` writes. Free whitespace lets a
/// small model wander into endless newlines.
pub fn compact_layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// A model's grammar compiler: its vocabulary as bytes, built on first use.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<TokenId>,
    factory: OnceLock<Result<ParserFactory, String>>,
    /// Compiled grammars by their text, fresh, to copy: clients send the same schema or tool
    /// set call after call, and `n` choices share one.
    compiled: std::sync::Mutex<std::collections::HashMap<String, Matcher>>,
}

/// Compiled grammars kept (past this, one goes for each new one).
const COMPILED_KEPT: usize = 256;

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, eos_token_ids: Vec<TokenId>) -> Self {
        Self {
            tokenizer,
            eos_token_ids,
            factory: OnceLock::new(),
            compiled: Default::default(),
        }
    }

    /// Builds the vocabulary's tables now (they take a moment for a large vocabulary), so that
    /// the first request that needs them does not wait.
    pub fn warm(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("grammar-warm".into())
            .spawn(move || {
                let _ = me.factory();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the grammar warm-up thread");
        }
    }

    fn factory(&self) -> Result<&ParserFactory, ServingError> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let built = build_factory(&self.tokenizer, &self.eos_token_ids);
                match &built {
                    Ok(_) => tracing::debug!(ms = started.elapsed().as_millis() as u64, "grammar tables built"),
                    Err(e) => tracing::warn!(error = %e, "this model's tokenizer cannot drive structured output"),
                }
                built
            })
            .as_ref()
            .map_err(|e| {
                ServingError::WrongModelType(format!(
                    "This model's tokenizer does not support structured output: {e}"
                ))
            })
    }

    /// Compiles `format` into a constraint for one request; a schema or grammar that does not
    /// compile is a 400 naming its field.
    pub fn constraint(&self, format: &OutputFormat) -> Result<Constraint, ServingError> {
        let factory = self.factory()?;
        let key = match &format.grammar {
            Grammar::JsonSchema(schema) => format!("json:{schema}"),
            Grammar::Regex(rx) => format!("regex:{rx}"),
            Grammar::Lark(lark) => format!("lark:{lark}"),
        };
        let cached = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(Matcher::deep_clone);
        let matcher = match cached {
            Some(m) => m,
            None => {
                let matcher = self.compile(factory, format)?;
                let mut kept = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() >= COMPILED_KEPT {
                    // One makes room, so that the grammar a request just compiled ahead of its
                    // start (`ChatModel::prepare`) is still here when it starts.
                    if let Some(old) = kept.keys().find(|k| **k != key).cloned() {
                        kept.remove(&old);
                    }
                }
                kept.insert(key, matcher.deep_clone());
                matcher
            }
        };
        Ok(Constraint(Box::new(GrammarConstraint {
            matcher,
            eos_token_ids: self.eos_token_ids.clone(),
            trie_eos: factory.tok_env().tok_trie().eos_token(),
        })))
    }

    fn compile(
        &self,
        factory: &ParserFactory,
        format: &OutputFormat,
    ) -> Result<Matcher, ServingError> {
        let started = std::time::Instant::now();
        let grammar = match &format.grammar {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(map) = &mut schema {
                    map.entry("x-guidance").or_insert_with(compact_layout);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = factory.create_parser(grammar).map_err(|e| {
            ServingError::invalid(
                &format.param,
                format!("'{}' could not be compiled: {e}", format.param),
            )
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ServingError::invalid(&format.param, e));
        }
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            "grammar compiled"
        );
        Ok(matcher)
    }
}

fn build_factory(tokenizer: &Arc<Tokenizer>, eos: &[TokenId]) -> Result<ParserFactory, String> {
    let json: Value = tokenizer
        .to_string(false)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))?;
    let words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
    let info = TokRxInfo::new(words.len() as u32, eos.first().copied().unwrap_or(0));
    let env: TokEnv = Arc::new(TokenizerBytes {
        trie: TokTrie::from(&info, &words),
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    // Its logs could quote the grammar, which is user data.
    factory.quiet();
    Ok(factory)
}

/// The vocabulary as llguidance sees it: every token's bytes, and the model's own tokenizer.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer
            .encode(String::from_utf8_lossy(s).as_ref(), false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

struct GrammarConstraint {
    matcher: Matcher,
    /// The model's end tokens: allowed wherever the grammar may end.
    eos_token_ids: Vec<TokenId>,
    /// The one the grammar's masks mark.
    trie_eos: TokenId,
}

impl TokenConstraint for GrammarConstraint {
    fn restrict(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let len = mask.len() as u32;
        let may_end = mask.is_allowed(self.trie_eos);
        let mut allowed = 0usize;
        for (t, l) in logits.iter_mut().enumerate() {
            let t = t as TokenId;
            let ok = if self.eos_token_ids.contains(&t) {
                may_end
            } else {
                t < len && mask.is_allowed(t)
            };
            if ok {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if allowed == 0 {
            return Err("no token can continue the output".into());
        }
        Ok(())
    }

    fn commit(&mut self, token: TokenId) -> Result<Progress, String> {
        if self.eos_token_ids.contains(&token) {
            return Ok(Progress::Done);
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| e.to_string())?;
        Ok(if self.matcher.is_stopped() {
            Progress::Done
        } else {
            Progress::Continue
        })
    }
}
