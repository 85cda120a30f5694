//! The model runner: owns the model and the KV-cache tensors, turns a scheduled step into a
//! ragged batch (token ids, positions, slot mapping, block tables) and runs it.

use candela_kernels::free_memory;
use candela_models::{Batch, CausalLm, KvCache, LmConfig, SeqAttention};
use candle_core::{DType, Device, Tensor};

use crate::ids::RequestId;
use crate::scheduler::{Scheduler, SchedulerOutput};

pub struct ModelRunner {
    model: Box<dyn CausalLm>,
    kv: KvCache,
    /// Mark prompt tokens for the model's higher precision ([`Batch::precise_rows`]).
    precise_prompts: bool,
}

/// How much memory the KV cache may take on this device when no size is given.
pub fn default_kv_budget(device: &Device) -> u64 {
    const GIB: u64 = 1 << 30;
    match device {
        // Pages are touched only as blocks fill, so a generous budget costs little until used.
        Device::Cpu => (free_memory(device).unwrap_or(4 * GIB) / 4).min(4 * GIB),
        _ => free_memory(device)
            .map(|free| free * 8 / 10)
            .unwrap_or(8 * GIB),
    }
}

/// What the KV cache holds when no dtype is given: f16 on the CPU when the model computes in f32
/// (half the bytes every decode step reads, and twice the tokens per GiB, as llama.cpp's
/// default; attention widens the rows to f32 as it loads them), else the model's dtype (the
/// CUDA kernels read the cache in the queries' dtype).
pub fn default_kv_dtype(device: &Device, model_dtype: DType) -> DType {
    match (device, model_dtype) {
        (Device::Cpu, DType::F32) => DType::F16,
        _ => model_dtype,
    }
}

/// Whether prompt tokens take the model's higher precision when none is asked
/// (`--prompt-precision auto`): where the CPU's quantized kernel multiplies with VNNI, which
/// makes two int8 terms cheap (10-30 % more prompt time); with AVX2 alone they cost about
/// twice the prompt time, and prompts go in one term, as llama.cpp computes them.
pub fn default_precise_prompts() -> bool {
    candela_kernels::quant_has_vnni()
}

impl ModelRunner {
    /// Allocates `num_blocks` KV blocks of `block_size` tokens of `kv_dtype` for the model;
    /// `precise_prompts`: compute prompt tokens at the model's higher precision
    /// ([`Batch::precise_rows`]).
    pub fn new(
        model: Box<dyn CausalLm>,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: DType,
        precise_prompts: bool,
    ) -> candela_models::Result<Self> {
        let cfg = model.config();
        let kv = KvCache::new(cfg, num_blocks, block_size, kv_dtype, model.device())?;
        // On a GPU the weights and the cache were uploaded asynchronously: let them land (and
        // any fault in them surface) here, at load, rather than in the first request.
        model.device().synchronize()?;
        Ok(Self {
            model,
            kv,
            precise_prompts,
        })
    }

    /// Blocks of `kv_dtype` that fit in `budget_bytes`.
    pub fn blocks_for_budget(
        cfg: &LmConfig,
        block_size: usize,
        kv_dtype: DType,
        budget_bytes: u64,
    ) -> usize {
        (budget_bytes / KvCache::bytes_per_block(cfg, block_size, kv_dtype) as u64) as usize
    }

    pub fn config(&self) -> &LmConfig {
        self.model.config()
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// Runs one step; returns the logits of each sampling sequence, in schedule order
    /// (`[sampling sequences, vocab]` f32, on the model's device), and those of the prompt
    /// positions whose log-probabilities are wanted.
    pub fn execute(
        &self,
        out: &SchedulerOutput,
        sched: &Scheduler,
    ) -> candela_models::Result<StepLogits> {
        let bs = self.kv.block_size;
        let n = out.num_tokens();
        let (mut ids, mut positions, mut slots) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut seqs = Vec::with_capacity(out.seqs.len());
        let mut logits_rows = Vec::new();
        let mut prompt_rows = Vec::new();
        let mut prompt_spans = Vec::new();
        let mut precise_rows = Vec::with_capacity(n);
        for s in &out.seqs {
            let req = sched.request(s.id).expect("scheduled request exists");
            let table: Vec<u32> = sched.kv().block_table(s.id).iter().map(|b| b.0).collect();
            let query_start = ids.len();
            for p in s.num_computed..s.num_computed + s.num_new {
                ids.push(req.tokens[p]);
                positions.push(p as u32);
                precise_rows.push(self.precise_prompts && p < req.num_prompt);
                slots.push(table[p / bs] * bs as u32 + (p % bs) as u32);
            }
            if s.samples {
                logits_rows.push((query_start + s.num_new - 1) as u32);
            }
            // Position p's logits predict prompt token p + 1.
            let end = (s.num_computed + s.num_new).min(req.num_prompt.saturating_sub(1));
            if req.full_prompt && s.num_computed < end {
                let first = s.num_computed;
                prompt_spans.push(PromptSpan {
                    id: s.id,
                    first,
                    len: end - first,
                });
                prompt_rows.extend((first..end).map(|p| (query_start + p - first) as u32));
            }
            seqs.push(SeqAttention {
                query_start,
                query_len: s.num_new,
                context_len: s.num_computed + s.num_new,
                block_table: table,
                prompt_len: req.num_prompt,
            });
        }
        let sampling = logits_rows.len();
        logits_rows.extend(prompt_rows);
        let batch = Batch::new(
            &ids,
            &positions,
            &slots,
            seqs,
            &logits_rows,
            precise_rows,
            self.model.device(),
        )?;
        let logits = self.model.forward(&batch, &self.kv)?;
        if prompt_spans.is_empty() {
            return Ok(StepLogits {
                sample: logits,
                prompt: None,
            });
        }
        let extra = logits_rows.len() - sampling;
        Ok(StepLogits {
            sample: logits.narrow(0, 0, sampling)?,
            prompt: Some((logits.narrow(0, sampling, extra)?, prompt_spans)),
        })
    }
}

/// A step's logits.
pub struct StepLogits {
    /// One row per sampling sequence, in schedule order.
    pub sample: Tensor,
    /// Rows of prompt positions, span after span.
    pub prompt: Option<(Tensor, Vec<PromptSpan>)>,
}

/// A request's prompt positions computed this step whose logits are wanted: positions
/// `first..first + len`, each predicting the prompt token after it.
#[derive(Clone, Copy, Debug)]
pub struct PromptSpan {
    pub id: RequestId,
    pub first: usize,
    pub len: usize,
}
