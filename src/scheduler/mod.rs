//! The scheduler: which requests run in the next step, and how many of their tokens.
//!
//! Synchronous, device-free and deterministic. Every request tracks `num_computed` against its
//! token count (prompt + generated); a step gives each scheduled request `num_new` tokens, so
//! prefill, chunked prefill, decode and prefix-cache hits are one code path. Running requests go
//! first (oldest first); waiting ones are admitted while the token budgets (all tokens, and prompt
//! tokens apart), the sequence limit and free blocks allow. When blocks run out, the newest running
//! request of the lowest priority is preempted: its blocks are freed and it waits to be
//! recomputed. An interactive request never waits behind batch work: when the sequence limit or
//! the free blocks would keep it out, the newest running batch requests give way to it.

use std::collections::{HashMap, VecDeque};

use crate::ids::{RequestId, TokenId};
use crate::kv_cache::KvCacheManager;

/// Interactive requests are admitted first and preempted last; batch-API work fills what is left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens in one step (prefill chunks + decodes).
    pub max_batched_tokens: usize,
    /// Most tokens of prefill chunks in a step where some sequence decodes (a sequence with
    /// more than one token to compute is prefilling: a prompt, or a preempted request's
    /// recomputation). Decodes do not count, so a step's prompt work, and the delay it adds to
    /// every stream decoding beside it, stay bounded however many streams decode. A step with
    /// no decode takes prompts up to `max_batched_tokens`.
    pub max_prefill_tokens: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// Most prompt positions of `full_prompt` requests a step computes: each needs its whole row of
/// logits (vocabulary-sized), which the model otherwise computes for one position a sequence.
pub const FULL_PROMPT_TOKENS_PER_STEP: usize = 512;

#[derive(Debug)]
pub struct SchedRequest {
    pub id: RequestId,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<TokenId>,
    pub num_prompt: usize,
    /// Tokens whose keys and values are in the cache.
    pub num_computed: usize,
    pub priority: Priority,
    /// Prompt tokens found in the prefix cache when first admitted.
    pub num_cached: usize,
    /// Compute the whole prompt, none of it from the prefix cache: its log-probabilities need
    /// every position's logits.
    pub full_prompt: bool,
}

impl SchedRequest {
    pub fn new(id: RequestId, prompt: Vec<TokenId>, priority: Priority) -> Self {
        Self {
            id,
            num_prompt: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            priority,
            num_cached: 0,
            full_prompt: false,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }
}

/// One request's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// Its tokens `[num_computed, num_computed + num_new)` run in this step.
    pub num_computed: usize,
    pub num_new: usize,
    /// Whether this step reaches the end of its tokens, so a new token is sampled.
    pub samples: bool,
}

#[derive(Debug, Default)]
pub struct SchedulerOutput {
    pub seqs: Vec<ScheduledSeq>,
    /// Requests that lost their blocks this step and went back to waiting.
    pub preempted: Vec<RequestId>,
}

impl SchedulerOutput {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_new).sum()
    }
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, SchedRequest>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    /// Preemptions since start, for metrics.
    pub num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            kv: KvCacheManager::new(cfg.num_blocks, cfg.block_size),
            cfg,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    pub fn request(&self, id: RequestId) -> Option<&SchedRequest> {
        self.requests.get(&id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Most tokens one request may hold: it must fit in the cache on its own.
    pub fn max_tokens_per_request(&self) -> usize {
        self.cfg.num_blocks * self.cfg.block_size
    }

    /// Queues a request behind those of the same or higher priority.
    pub fn add(&mut self, req: SchedRequest) {
        let pos = self
            .waiting
            .iter()
            .position(|w| self.requests[w].priority > req.priority)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, req.id);
        self.requests.insert(req.id, req);
    }

    /// Removes a request wherever it is and frees its blocks (cancel or finish).
    pub fn remove(&mut self, id: RequestId) -> Option<SchedRequest> {
        let req = self.requests.remove(&id)?;
        self.running.retain(|r| *r != id);
        self.waiting.retain(|r| *r != id);
        self.kv.free(id);
        Some(req)
    }

    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        self.make_room_for_interactive(&mut out);
        // Preemptions for running requests' blocks (memory short this step) hold back admission.
        let mut short = false;
        let mut budget = self.cfg.max_batched_tokens;
        // The prompt cap keeps the streams that decode in this step moving; with none decoding,
        // no one waits on the step, and prompts take all of it (fewer, fuller steps).
        let decoding = self.running.iter().any(|id| {
            let req = &self.requests[id];
            req.tokens.len() - req.num_computed == 1
        });
        let mut prefill_budget = if decoding {
            self.cfg.max_prefill_tokens
        } else {
            budget
        };
        // Tokens to compute now for a request with `remaining` left, within both budgets.
        let take = |remaining: usize, budget: usize, prefill_budget: usize| match remaining {
            1 => 1.min(budget),
            _ => remaining.min(budget).min(prefill_budget),
        };
        // Prompt positions whose logits are all wanted (`full_prompt`), within their own cap.
        let mut scored_budget = FULL_PROMPT_TOKENS_PER_STEP;
        let score = |req: &SchedRequest, remaining: usize, num_new: usize, scored: usize| {
            if req.full_prompt && remaining > 1 {
                num_new.min(scored)
            } else {
                num_new
            }
        };

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let req = &self.requests[&id];
            let remaining = req.tokens.len() - req.num_computed;
            let num_new = take(remaining, budget, prefill_budget);
            let num_new = score(req, remaining, num_new, scored_budget);
            if num_new == 0 {
                // Prefill budget spent: this one continues next step.
                i += 1;
                continue;
            }
            let total = req.num_computed + num_new;
            let mut scheduled = true;
            while !self.kv.allocate(id, total, &[]) {
                let victim = self.pick_victim();
                let at = self.running.iter().position(|r| *r == victim);
                self.preempt(victim);
                out.preempted.push(victim);
                short = true;
                if victim == id {
                    scheduled = false;
                    break;
                }
                // A victim scheduled earlier in this step (an older request of a lower
                // priority) leaves the step, and its tokens go back to the budgets.
                if at.is_some_and(|at| at < i) {
                    i -= 1;
                    if let Some(k) = out.seqs.iter().position(|s| s.id == victim) {
                        let gone = out.seqs.remove(k);
                        budget += gone.num_new;
                        if self.requests[&victim].tokens.len() - gone.num_computed > 1 {
                            prefill_budget += gone.num_new;
                        }
                    }
                }
            }
            if scheduled {
                let req = &self.requests[&id];
                out.seqs.push(ScheduledSeq {
                    id,
                    num_computed: req.num_computed,
                    num_new,
                    samples: total == req.tokens.len(),
                });
                budget -= num_new;
                if remaining > 1 {
                    prefill_budget -= num_new;
                    if req.full_prompt {
                        scored_budget -= num_new;
                    }
                }
                i += 1;
            }
        }

        // Admit waiting requests, unless memory was short this step.
        while !short && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let req = &self.requests[&id];
            let prefix = if req.full_prompt {
                Vec::new()
            } else {
                self.kv.cached_prefix(&req.tokens)
            };
            let num_computed = prefix.len() * self.cfg.block_size;
            let remaining = req.tokens.len() - num_computed;
            let num_new = take(remaining, budget, prefill_budget);
            let num_new = score(req, remaining, num_new, scored_budget);
            let total = num_computed + num_new;
            if num_new == 0 || !self.kv.allocate(id, total, &prefix) {
                break;
            }
            let req = self
                .requests
                .get_mut(&id)
                .expect("waiting request is known");
            req.num_computed = num_computed;
            if req.num_generated() == 0 {
                req.num_cached = num_computed;
            }
            self.waiting.pop_front();
            self.running.push(id);
            out.seqs.push(ScheduledSeq {
                id,
                num_computed,
                num_new,
                samples: total == req.tokens.len(),
            });
            budget -= num_new;
            if remaining > 1 {
                prefill_budget -= num_new;
                if req.full_prompt {
                    scored_budget -= num_new;
                }
            }
        }
        out
    }

    /// Preempts the newest running batch requests while the sequence limit or the free blocks
    /// would keep the interactive request at the head of the queue waiting (its first chunk's
    /// blocks, counted without its cached prefix: at worst a batch request recomputes early).
    fn make_room_for_interactive(&mut self, out: &mut SchedulerOutput) {
        let Some(front) = self.waiting.front().map(|id| &self.requests[id]) else {
            return;
        };
        if front.priority != Priority::Interactive {
            return;
        }
        let first_chunk = front.tokens.len().min(self.cfg.max_batched_tokens);
        let blocks = first_chunk.div_ceil(self.cfg.block_size);
        while self.running.len() >= self.cfg.max_num_seqs || self.kv.num_free_blocks() < blocks {
            let newest_batch = self
                .running
                .iter()
                .rev()
                .find(|r| self.requests[r].priority == Priority::Batch);
            let Some(&victim) = newest_batch else {
                return;
            };
            self.preempt(victim);
            out.preempted.push(victim);
        }
    }

    /// The newest running request of the lowest priority.
    fn pick_victim(&self) -> RequestId {
        let lowest = self
            .running
            .iter()
            .map(|r| self.requests[r].priority)
            .max()
            .unwrap_or_default();
        *self
            .running
            .iter()
            .rev()
            .find(|r| self.requests[r].priority == lowest)
            .expect("a running request exists while allocating for one")
    }

    fn preempt(&mut self, id: RequestId) {
        self.kv.free(id);
        self.running.retain(|r| *r != id);
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        req.num_computed = 0;
        // First of its lane: behind waiting requests of a higher priority, before its peers.
        let priority = req.priority;
        let pos = self
            .waiting
            .iter()
            .position(|w| self.requests[w].priority >= priority)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, id);
        self.num_preemptions += 1;
    }

    /// Records that a step ran: the scheduled tokens are now in the cache.
    pub fn advance(&mut self, out: &SchedulerOutput) {
        for s in &out.seqs {
            if let Some(req) = self.requests.get_mut(&s.id) {
                req.num_computed = s.num_computed + s.num_new;
                self.kv.commit(s.id, &req.tokens, req.num_computed);
            }
        }
    }

    /// Appends a sampled token to a request.
    pub fn append(&mut self, id: RequestId, token: TokenId) {
        if let Some(req) = self.requests.get_mut(&id) {
            req.tokens.push(token);
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        self.kv.check_invariants();
        for id in &self.running {
            assert!(
                !self.waiting.contains(id),
                "{id:?} both running and waiting"
            );
        }
        for id in &self.waiting {
            assert!(
                self.kv.block_table(*id).is_empty(),
                "waiting {id:?} holds blocks"
            );
        }
    }
}

#[cfg(test)]
mod tests;
