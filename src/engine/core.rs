use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use candela_kernels::RowSampling;
use candle_core::Tensor;
use tokio::sync::mpsc as tokio_mpsc;

use super::{
    Command, EngineError, EngineHandle, EngineOutput, EngineRequest, EngineStats, FinishReason,
};
use crate::ids::RequestId;
use crate::runner::ModelRunner;
use crate::sampling::{Progress, Sampled, Sampler, TokenConstraint};
use crate::scheduler::{SchedRequest, Scheduler, SchedulerConfig, SchedulerOutput};

/// Engine sizing, fixed at start.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
}

struct Active {
    req: EngineRequest,
    sampler: Sampler,
    /// Structured output: masks each row before sampling (on the host).
    constraint: Option<Box<dyn TokenConstraint>>,
    /// The prompt's log-probabilities so far, by position, when asked for; sent with the first
    /// token.
    prompt_logprobs: Option<Vec<Option<Sampled>>>,
    out: tokio_mpsc::UnboundedSender<Result<EngineOutput, EngineError>>,
    cached_prompt_tokens: Option<usize>,
}

struct EngineCore {
    scheduler: Scheduler,
    runner: ModelRunner,
    active: HashMap<RequestId, Active>,
    rx: mpsc::Receiver<Command>,
    stats: Arc<EngineStats>,
    healthy: Arc<AtomicBool>,
    name: String,
}

/// Starts an engine thread for `runner` and returns its handle.
pub fn spawn(name: &str, runner: ModelRunner, cfg: EngineConfig) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::default());
    let healthy = Arc::new(AtomicBool::new(true));
    let scheduler = Scheduler::new(cfg.scheduler.clone());
    let max_request_tokens = scheduler
        .max_tokens_per_request()
        .min(runner.config().context_len);
    stats
        .kv_blocks_total
        .store(cfg.scheduler.num_blocks as u64, Ordering::Relaxed);
    let core = EngineCore {
        scheduler,
        runner,
        active: HashMap::new(),
        rx,
        stats: stats.clone(),
        healthy: healthy.clone(),
        name: name.to_string(),
    };
    std::thread::Builder::new()
        .name(format!("engine-{name}"))
        .spawn(move || core.run())?;
    Ok(EngineHandle {
        tx,
        next_id: Arc::new(AtomicU64::new(1)),
        healthy,
        stats,
        max_request_tokens,
    })
}

impl EngineCore {
    fn run(mut self) {
        loop {
            // Block only when idle; otherwise take whatever arrived and keep stepping.
            // A dropped handle side counts as a shutdown.
            let mut next =
                (!self.scheduler.has_work()).then(|| self.rx.recv().unwrap_or(Command::Shutdown));
            loop {
                let cmd = match next.take() {
                    Some(cmd) => cmd,
                    None => match self.rx.try_recv() {
                        Ok(cmd) => cmd,
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => Command::Shutdown,
                    },
                };
                if !self.handle(cmd) {
                    return;
                }
            }
            self.drop_cancelled();
            if self.scheduler.has_work() {
                if let Err(e) = self.step() {
                    tracing::error!(engine = %self.name, error = %e, "engine step failed; failing requests in flight");
                    self.healthy.store(false, Ordering::Relaxed);
                    self.fail_all(EngineError::Model(e.to_string()));
                }
            }
            self.publish_stats();
        }
    }

    /// Returns false when the engine should stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add { id, mut req, out } => {
                if !self.healthy.load(Ordering::Relaxed) {
                    let _ = out.send(Err(EngineError::Stopped(
                        "an earlier failure stopped the engine".into(),
                    )));
                    return true;
                }
                let mut sched = SchedRequest::new(id, req.prompt.clone(), req.priority);
                sched.full_prompt = req.prompt_logprobs.is_some();
                self.scheduler.add(sched);
                let sampler = Sampler::new(req.sampling.clone());
                let constraint = req.constraint.take().map(|c| c.0);
                let prompt_logprobs = req.prompt_logprobs.map(|_| vec![None; req.prompt.len()]);
                self.active.insert(
                    id,
                    Active {
                        req,
                        sampler,
                        constraint,
                        prompt_logprobs,
                        out,
                        cached_prompt_tokens: None,
                    },
                );
                true
            }
            Command::Shutdown => {
                self.fail_all(EngineError::ShuttingDown);
                false
            }
        }
    }

    /// Frees the requests whose client went away.
    fn drop_cancelled(&mut self) {
        let gone: Vec<RequestId> = self
            .active
            .iter()
            .filter(|(_, a)| a.out.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            tracing::debug!(engine = %self.name, request = id.0, "client gone; freeing its blocks");
            self.finish(id);
        }
    }

    fn finish(&mut self, id: RequestId) {
        self.scheduler.remove(id);
        self.active.remove(&id);
    }

    fn fail_all(&mut self, err: EngineError) {
        for (id, a) in self.active.drain() {
            let _ = a.out.send(Err(err.clone()));
            self.scheduler.remove(id);
        }
    }

    fn step(&mut self) -> candela_models::Result<()> {
        let started = Instant::now();
        let out: SchedulerOutput = self.scheduler.schedule();
        if out.seqs.is_empty() {
            // Nothing runs and nothing can be admitted: the waiting requests can never fit.
            if self.scheduler.num_running() == 0 {
                let stuck: Vec<RequestId> = self.active.keys().copied().collect();
                for id in stuck {
                    if let Some(a) = self.active.get(&id) {
                        let _ = a.out.send(Err(EngineError::Model(
                            "the request does not fit in the KV cache".into(),
                        )));
                    }
                    self.finish(id);
                }
            }
            return Ok(());
        }
        // On the CPU, run the forward pass on a worker of the compute pool, so that the kernels'
        // parallel loops start on an awake pool instead of waking it from this thread hundreds
        // of times a step. A GPU's launches need no pool: handing them over would only add a
        // wake-up to every step.
        let (runner, scheduler) = (&self.runner, &self.scheduler);
        let step = if runner.device().is_cpu() {
            rayon::scope(|_| runner.execute(&out, scheduler))?
        } else {
            runner.execute(&out, scheduler)?
        };
        let logits = step.sample;
        if let Some((rows, spans)) = step.prompt {
            self.prompt_logprobs(&rows, &spans)?;
        }
        let launched = started.elapsed();
        self.scheduler.advance(&out);
        self.stats
            .computed_tokens
            .fetch_add(out.num_tokens() as u64, Ordering::Relaxed);
        let sampled = self.sample(&out, &logits)?;
        let mut done = Vec::new();
        for (id, sampled) in sampled {
            let (Some(req), Some(active)) = (self.scheduler.request(id), self.active.get_mut(&id))
            else {
                continue;
            };
            let sampled = match sampled {
                Ok(sampled) => sampled,
                Err(e) => {
                    let _ = active.out.send(Err(EngineError::Constraint(e)));
                    done.push(id);
                    continue;
                }
            };
            let progress = match active.constraint.as_mut().map(|c| c.commit(sampled.token)) {
                None | Some(Ok(Progress::Continue)) => Progress::Continue,
                Some(Ok(Progress::Done)) => Progress::Done,
                Some(Err(e)) => {
                    let _ = active.out.send(Err(EngineError::Constraint(e)));
                    done.push(id);
                    continue;
                }
            };
            let generated = req.num_generated() + 1;
            let total = req.tokens.len() + 1;
            let finish = if active.req.stop_token_ids.contains(&sampled.token)
                || progress == Progress::Done
            {
                Some(FinishReason::Stop)
            } else if generated >= active.req.max_tokens
                || total >= self.scheduler.max_tokens_per_request()
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            // The first sampled token reports how much of the prompt came from the prefix cache.
            let cached = match active.cached_prompt_tokens.replace(req.num_cached) {
                None => req.num_cached,
                Some(_) => 0,
            };
            let token = sampled.token;
            let sent = active.out.send(Ok(EngineOutput {
                sampled,
                finish,
                cached_prompt_tokens: cached,
                prompt_logprobs: active
                    .prompt_logprobs
                    .take()
                    .map(|lps| {
                        let prompt = &req.tokens[..req.num_prompt];
                        lps.into_iter()
                            .zip(prompt)
                            .map(|(lp, &token)| {
                                lp.unwrap_or(Sampled {
                                    token,
                                    logprob: None,
                                    top_logprobs: Vec::new(),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }));
            self.scheduler.append(id, token);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if finish.is_some() || sent.is_err() {
                done.push(id);
            }
        }
        for id in done {
            self.finish(id);
        }
        let micros = |d: std::time::Duration| d.as_micros() as u64;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .step_micros
            .fetch_add(micros(started.elapsed()), Ordering::Relaxed);
        self.stats
            .step_launch_micros
            .fetch_add(micros(launched), Ordering::Relaxed);
        self.stats
            .preemptions
            .store(self.scheduler.num_preemptions, Ordering::Relaxed);
        tracing::trace!(engine = %self.name, seqs = out.seqs.len(), tokens = out.num_tokens(), ms = started.elapsed().as_secs_f64() * 1e3, "step");
        Ok(())
    }

    /// The next token of each sampling sequence of `out` still active, from its row of `logits`.
    /// On the CPU every row is sampled here. Elsewhere a kernel samples the rows where the
    /// logits are and only token ids come back; rows that need the host (penalties,
    /// log-probabilities, a constraint's mask) are copied over together. A constraint that fails
    /// fails its request only.
    #[allow(clippy::type_complexity)]
    fn sample(
        &mut self,
        out: &SchedulerOutput,
        logits: &Tensor,
    ) -> candela_models::Result<Vec<(RequestId, Result<Sampled, String>)>> {
        let ids: Vec<RequestId> = out
            .seqs
            .iter()
            .filter(|s| s.samples)
            .map(|s| s.id)
            .collect();
        let on_host = logits.device().is_cpu();
        let device = if on_host {
            Vec::new()
        } else {
            let settings: Vec<Option<RowSampling>> = ids
                .iter()
                .map(|id| {
                    let active = self.active.get_mut(id)?;
                    match active.constraint {
                        Some(_) => None,
                        None => active.sampler.device_settings(),
                    }
                })
                .collect();
            let rows: Vec<RowSampling> = settings
                .iter()
                .map(|s| s.unwrap_or(RowSampling::GREEDY))
                .collect();
            let tokens = if settings.iter().any(Option::is_some) {
                candela_kernels::sample(logits, &rows)?
            } else {
                vec![0; rows.len()]
            };
            settings
                .iter()
                .zip(tokens)
                .map(|(s, token)| s.map(|_| token))
                .collect()
        };
        let mut host_rows: Vec<Option<Vec<f32>>> = if on_host {
            logits.to_vec2::<f32>()?.into_iter().map(Some).collect()
        } else {
            // The rows the kernel left to the host come over in one copy.
            let need: Vec<u32> = (0..ids.len() as u32)
                .filter(|&i| matches!(device.get(i as usize), Some(None)))
                .collect();
            let mut rows = vec![None; ids.len()];
            if !need.is_empty() {
                let at = Tensor::new(need.as_slice(), logits.device())?;
                let copied = logits.index_select(&at, 0)?.to_vec2::<f32>()?;
                for (&i, row) in need.iter().zip(copied) {
                    rows[i as usize] = Some(row);
                }
            }
            rows
        };
        let masked = self.restrict_rows(&ids, &mut host_rows);
        let mut sampled = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let (Some(req), Some(active)) = (self.scheduler.request(id), self.active.get_mut(&id))
            else {
                continue;
            };
            if let Some(Some(token)) = device.get(i) {
                let sampled_token = Sampled {
                    token: *token,
                    logprob: None,
                    top_logprobs: Vec::new(),
                };
                sampled.push((id, Ok(sampled_token)));
                continue;
            }
            if let Some(Err(e)) = masked.get(&i) {
                sampled.push((id, Err(e.clone())));
                continue;
            }
            let mut row = match host_rows.get_mut(i).and_then(Option::take) {
                Some(row) => row,
                // A constrained row is always copied over and masked; never sample one unmasked.
                None if active.constraint.is_some() => {
                    let e = "the constrained row was not masked".to_string();
                    sampled.push((id, Err(e)));
                    continue;
                }
                None => logits.get(i)?.to_vec1::<f32>()?,
            };
            let (prompt, output) = req.tokens.split_at(req.num_prompt);
            sampled.push((id, Ok(active.sampler.sample(&mut row, prompt, output))));
        }
        Ok(sampled)
    }

    /// Records the log-probabilities of the prompt tokens that `rows` (one per position of
    /// `spans`, in order) predict.
    fn prompt_logprobs(
        &mut self,
        rows: &Tensor,
        spans: &[crate::runner::PromptSpan],
    ) -> candela_models::Result<()> {
        let rows = rows.to_vec2::<f32>()?;
        let mut rows = rows.iter();
        for span in spans {
            let (Some(req), Some(active)) = (
                self.scheduler.request(span.id),
                self.active.get_mut(&span.id),
            ) else {
                rows.nth(span.len.saturating_sub(1));
                continue;
            };
            if active.prompt_logprobs.is_none() {
                // Recomputed after a preemption: the entries went out with the first token.
                rows.nth(span.len.saturating_sub(1));
                continue;
            }
            let k = active.req.prompt_logprobs.unwrap_or(0);
            for p in span.first..span.first + span.len {
                let Some(row) = rows.next() else { break };
                let token = req.tokens[p + 1];
                let (logprob, top_logprobs) = crate::sampling::logprob_of(row, token, k);
                if let Some(entry) = active
                    .prompt_logprobs
                    .as_mut()
                    .and_then(|lps| lps.get_mut(p + 1))
                {
                    *entry = Some(Sampled {
                        token,
                        logprob: Some(logprob),
                        top_logprobs,
                    });
                }
            }
        }
        Ok(())
    }

    /// Masks the rows of the constrained sequences (row `i` is `ids[i]`'s), in parallel: a mask
    /// takes from tens of microseconds to a millisecond, and a step may hold hundreds of
    /// constrained sequences. Returns each masked row's outcome by its index.
    fn restrict_rows(
        &mut self,
        ids: &[RequestId],
        rows: &mut [Option<Vec<f32>>],
    ) -> HashMap<usize, Result<(), String>> {
        let mut work: Vec<(usize, Box<dyn TokenConstraint>, Vec<f32>)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let Some(active) = self.active.get_mut(id) else {
                continue;
            };
            if active.constraint.is_none() {
                continue;
            }
            // A constrained row always comes to the host (see `sample`).
            if let Some(row) = rows.get_mut(i).and_then(Option::take) {
                if let Some(c) = active.constraint.take() {
                    work.push((i, c, row));
                }
            }
        }
        let restrict =
            |(_, c, row): &mut (usize, Box<dyn TokenConstraint>, Vec<f32>)| c.restrict(row);
        let outcomes: Vec<Result<(), String>> = if work.len() > 1 {
            use rayon::prelude::*;
            work.par_iter_mut().map(restrict).collect()
        } else {
            work.iter_mut().map(restrict).collect()
        };
        let mut masked = HashMap::with_capacity(work.len());
        for ((i, c, row), outcome) in work.into_iter().zip(outcomes) {
            rows[i] = Some(row);
            if let Some(active) = self.active.get_mut(&ids[i]) {
                active.constraint = Some(c);
            }
            masked.insert(i, outcome);
        }
        masked
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let kv = self.scheduler.kv();
        s.running
            .store(self.scheduler.num_running() as u64, Ordering::Relaxed);
        s.waiting
            .store(self.scheduler.num_waiting() as u64, Ordering::Relaxed);
        s.kv_blocks_used.store(
            (kv.num_blocks() - kv.num_free_blocks()) as u64,
            Ordering::Relaxed,
        );
        s.prefix_queried_tokens
            .store(kv.prefix_queried_tokens, Ordering::Relaxed);
        s.prefix_hit_tokens
            .store(kv.prefix_hit_tokens, Ordering::Relaxed);
    }
}
