//! Text generation on a chat/completion model: prompt validation against the context, and the
//! stream of text chunks a request produces.

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::detokenizer::Detokenizer;
use super::stop::StopMatcher;
use super::structured::{Grammars, OutputFormat};
use super::template::{ChatMessage, ChatTemplate};
use super::{ModelInfo, ServingError};
use crate::engine::{EngineError, EngineHandle, EngineRequest, FinishReason, RequestStream};
use crate::ids::TokenId;
use crate::sampling::SamplingParams;
use crate::scheduler::Priority;

/// What a client asked for, validated, before it becomes an engine request.
#[derive(Clone, Debug, Default)]
pub struct GenParams {
    pub sampling: SamplingParams,
    /// `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// The request field that set `max_tokens`, for errors (`max_tokens` when empty).
    pub max_tokens_param: &'static str,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub priority: Priority,
    /// Structured output: a JSON schema or grammar the text must follow.
    pub format: Option<OutputFormat>,
    /// The prompt's log-probabilities, with this many alternatives per token.
    pub prompt_logprobs: Option<usize>,
}

pub struct ChatModel {
    pub info: ModelInfo,
    pub engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    /// Token ids below this are valid (the tokenizer's own count copies its whole vocabulary).
    vocab_size: u32,
    template: ChatTemplate,
    eos_token_ids: Vec<TokenId>,
    grammars: Arc<Grammars>,
}

/// One log-probability entry, as OpenAI reports it.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// A piece of generated text: what one engine token turned into after detokenization and stop
/// strings (possibly empty while a character or a possible stop string is incomplete).
#[derive(Clone, Debug)]
pub struct GenChunk {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
}

impl ChatModel {
    pub fn new(
        info: ModelInfo,
        engine: EngineHandle,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        eos_token_ids: Vec<TokenId>,
        model_vocab_size: usize,
    ) -> Self {
        let tokenizer = Arc::new(tokenizer);
        let grammars = Arc::new(Grammars::new(tokenizer.clone(), eos_token_ids.clone()));
        grammars.warm();
        Self {
            info,
            engine,
            grammars,
            // An id past the embeddings' rows is refused at the edge: on a GPU the lookup's
            // bounds check is a device assert, which leaves the device unusable for every
            // later call.
            vocab_size: tokenizer.get_vocab_size(true).min(model_vocab_size) as u32,
            tokenizer,
            template,
            eos_token_ids,
        }
    }

    /// Renders and tokenizes a conversation, the assistant's turn opened.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<TokenId>, ServingError> {
        self.chat_prompt_ending(messages, TurnEnd::Open)
    }

    /// Renders and tokenizes a conversation, ending as `end` says.
    pub fn chat_prompt_ending(
        &self,
        messages: &[ChatMessage],
        end: TurnEnd,
    ) -> Result<Vec<TokenId>, ServingError> {
        let text = self.render(messages, end)?;
        // The template writes any BOS itself.
        self.tokenize(&text, false, "messages")
    }

    /// A conversation as the chat template writes it, ending as `end` says.
    pub fn render(&self, messages: &[ChatMessage], end: TurnEnd) -> Result<String, ServingError> {
        if messages.is_empty() {
            return Err(ServingError::invalid(
                "messages",
                "`messages` must contain at least one message.",
            ));
        }
        let render = |messages: &[ChatMessage], open: bool| {
            self.template
                .render(messages, open)
                .map_err(|e| ServingError::invalid("messages", e))
        };
        let last = &messages[messages.len() - 1];
        match end {
            TurnEnd::Open => render(messages, true),
            TurnEnd::Closed => render(messages, false),
            TurnEnd::Continued if last.role != "assistant" => Err(ServingError::invalid(
                "messages",
                "To continue the final message, the last message must be the assistant's.",
            )),
            // Nothing to continue: the assistant's turn opened as usual.
            TurnEnd::Continued if last.content.is_empty() => {
                render(&messages[..messages.len() - 1], true)
            }
            TurnEnd::Continued => {
                // The template closes every turn: a mark at the end of the final message's text
                // shows where to cut what it wrote after (a search for the text itself could
                // match the turn's end marker or an earlier message, and a template may trim).
                let mark = format!(
                    "\u{1}CANDELA-CONTINUE-{}\u{1}",
                    uuid::Uuid::new_v4().simple()
                );
                let mut marked = messages.to_vec();
                let n = marked.len();
                marked[n - 1].content.push_str(&mark);
                let text = render(&marked, false)?;
                match text
                    .match_indices(&mark)
                    .map(|(at, _)| at)
                    .collect::<Vec<_>>()[..]
                {
                    [at] => Ok(text[..at].to_string()),
                    _ => Err(ServingError::invalid(
                        "messages",
                        "The chat template rewrites the final message, so it cannot be continued.",
                    )),
                }
            }
        }
    }

    /// Tokenizes a raw completion prompt.
    pub fn completion_prompt(&self, prompt: &str) -> Result<Vec<TokenId>, ServingError> {
        if prompt.is_empty() {
            return Err(ServingError::invalid(
                "prompt",
                "`prompt` must not be empty.",
            ));
        }
        self.tokenize(prompt, true, "prompt")
    }

    fn tokenize(
        &self,
        text: &str,
        special: bool,
        param: &str,
    ) -> Result<Vec<TokenId>, ServingError> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| ServingError::invalid(param, format!("could not tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Compiles the output format of `params` on a blocking thread, for `start` to find it
    /// compiled: a grammar takes a millisecond or two (a pathological one longer, within
    /// llguidance's bounds), and the first one may wait for the vocabulary's tables, none of
    /// which should hold an async worker.
    pub async fn prepare(&self, params: &GenParams) -> Result<(), ServingError> {
        let Some(format) = params.format.clone() else {
            return Ok(());
        };
        let grammars = self.grammars.clone();
        let param = format.param.clone();
        tokio::task::spawn_blocking(move || grammars.constraint(&format).map(drop))
            .await
            .unwrap_or_else(|e| {
                Err(ServingError::invalid(
                    &param,
                    format!("'{param}' could not be compiled: {e}"),
                ))
            })
    }

    /// Checks the prompt and output length against the context and starts generating.
    pub fn start(
        &self,
        prompt: Vec<TokenId>,
        params: GenParams,
        prompt_param: &str,
    ) -> Result<Generation, ServingError> {
        // Token-id prompts are checked where they are parsed; this also catches a tokenizer
        // that knows more tokens than the model has embeddings for.
        if let Some(id) = prompt.iter().find(|&&t| t >= self.vocab_size) {
            return Err(ServingError::invalid(
                prompt_param,
                format!(
                    "the {prompt_param} holds token id {id}, outside this model's vocabulary (size {}).",
                    self.vocab_size
                ),
            ));
        }
        let limit = self.context_limit();
        let max_tokens_param = match params.max_tokens_param {
            "" => "max_tokens",
            named => named,
        };
        let max_tokens = params
            .max_tokens
            .unwrap_or_else(|| limit.saturating_sub(prompt.len()).min(self.info.max_tokens));
        if prompt.len() + max_tokens > limit || max_tokens == 0 {
            let what = if prompt_param == "messages" {
                "messages"
            } else {
                "prompt"
            };
            return Err(ServingError::Invalid {
                message: format!(
                    "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the {what}, {max_tokens} in the completion). Please reduce the length of the {what} or completion.",
                    prompt.len() + max_tokens,
                    prompt.len(),
                ),
                param: Some(if params.max_tokens.is_some() { max_tokens_param.into() } else { prompt_param.into() }),
            });
        }
        if max_tokens > self.info.max_tokens {
            return Err(ServingError::invalid(
                max_tokens_param,
                format!(
                    "{max_tokens_param} is too large: {max_tokens}. This model supports at most {} completion tokens.",
                    self.info.max_tokens
                ),
            ));
        }
        let constraint = match &params.format {
            Some(format) => Some(self.grammars.constraint(format)?),
            None => None,
        };
        let prompt_tokens = prompt.len();
        let logprobs = params.sampling.logprobs.is_some();
        let stream = self.engine.add(EngineRequest {
            prompt,
            sampling: params.sampling,
            max_tokens,
            stop_token_ids: if params.ignore_eos {
                Vec::new()
            } else {
                self.eos_token_ids.clone()
            },
            priority: params.priority,
            constraint,
            prompt_logprobs: params.prompt_logprobs,
        })?;
        Ok(Generation {
            stream: Some(stream),
            tokenizer: self.tokenizer.clone(),
            detok: Detokenizer::new(&[]),
            stop: StopMatcher::new(params.stop),
            logprobs,
            prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            prompt_logprobs: None,
        })
    }

    /// Most tokens of a prompt and its output: the catalog may declare a smaller context than
    /// the engine holds.
    pub fn context_limit(&self) -> usize {
        self.engine.max_request_tokens.min(self.info.context_size)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }
}

impl Generation {
    /// The stop string that ended the generation, if one did.
    pub fn stop_sequence(&self) -> Option<&str> {
        self.stop.matched.as_deref()
    }
}

/// How a rendered conversation ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnEnd {
    /// With the assistant's turn opened, for its answer (what every request has by default).
    Open,
    /// With the last turn closed (`add_generation_prompt: false`).
    Closed,
    /// Inside the final assistant message, for the answer to go on from its text (vLLM's
    /// `continue_final_message`, Anthropic's prefill).
    Continued,
}

/// A running generation. Dropping it cancels the request in the engine.
pub struct Generation {
    stream: Option<RequestStream>,
    tokenizer: Arc<Tokenizer>,
    detok: Detokenizer,
    stop: StopMatcher,
    logprobs: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// With `prompt_logprobs`, once the first token is out: an entry per prompt token (`None`
    /// for the first, which nothing predicts).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

impl Generation {
    /// The next chunk; `None` after the chunk that carried the finish reason.
    pub async fn next(&mut self) -> Option<Result<GenChunk, ServingError>> {
        let stream = self.stream.as_mut()?;
        let out = match stream.next().await {
            Some(Ok(out)) => out,
            Some(Err(e)) => {
                self.stream = None;
                return Some(Err(e.into()));
            }
            None => {
                self.stream = None;
                return Some(Err(EngineError::Stopped(
                    "the request ended without finishing".into(),
                )
                .into()));
            }
        };
        self.completion_tokens += 1;
        self.cached_tokens += out.cached_prompt_tokens;
        let token = out.sampled.token;
        let piece = self.detok.push(&self.tokenizer, token);
        let (mut text, stopped) = self.stop.push(&piece);
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else {
            out.finish
        };
        if finish.is_some() {
            if !stopped {
                text.push_str(&self.stop.flush());
            }
            // Ends the engine request now if a stop string ended it early.
            self.stream = None;
        }
        let text_of = |id: TokenId| self.tokenizer.decode(&[id], false).unwrap_or_default();
        let entry = |s: &crate::sampling::Sampled| TokenLogprob {
            token: text_of(s.token),
            logprob: s.logprob.unwrap_or(0.0),
            top: s
                .top_logprobs
                .iter()
                .map(|&(id, lp)| (text_of(id), lp))
                .collect(),
        };
        if !out.prompt_logprobs.is_empty() {
            self.prompt_logprobs = Some(
                out.prompt_logprobs
                    .iter()
                    .map(|s| s.logprob.is_some().then(|| entry(s)))
                    .collect(),
            );
        }
        let logprobs = if self.logprobs {
            vec![entry(&out.sampled)]
        } else {
            Vec::new()
        };
        Some(Ok(GenChunk {
            text,
            logprobs,
            finish,
        }))
    }
}
