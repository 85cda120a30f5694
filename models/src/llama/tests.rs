use std::collections::HashMap;

use super::*;
use crate::SeqAttention;

/// Llama 3.1's scaling, against values computed with Hugging Face's formula
/// (`_compute_llama3_parameters`, in f64): high frequencies kept, low ones divided by the
/// factor, the band between blended. Linear and per-frequency divisors divide; unknown kinds
/// are refused by name.
#[test]
fn rope_scaling_follows_hugging_face() {
    let config = serde_json::json!({
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"
    });
    let scaling = RopeScaling::from_config(Some(&config)).unwrap();
    let inv = inv_frequencies(128, 500_000., &scaling).unwrap();
    let want = [
        (0, 1.0),
        (20, 0.016_560_44),
        (27, 0.003_942_276),
        (30, 0.001_371_893_6),
        (33, 0.000_312_693_75),
        (36, 7.784_655e-5),
        (48, 6.647_87e-6),
        (63, 3.068_926e-7),
    ];
    for (i, w) in want {
        assert!(((inv[i] - w) / w).abs() < 1e-5, "{i}: {} vs {w}", inv[i]);
    }
    let plain = inv_frequencies(128, 500_000., &RopeScaling::None).unwrap();
    let linear =
        RopeScaling::from_config(Some(&serde_json::json!({"type": "linear", "factor": 2.0})));
    let halved = inv_frequencies(128, 500_000., &linear.unwrap()).unwrap();
    assert!(plain
        .iter()
        .zip(&halved)
        .all(|(p, h)| (p / 2. - h).abs() <= p * 1e-6));
    let divisors = RopeScaling::Divisors(vec![4.0; 64]);
    let quartered = inv_frequencies(128, 500_000., &divisors).unwrap();
    assert!(plain
        .iter()
        .zip(&quartered)
        .all(|(p, q)| (p / 4. - q).abs() <= p * 1e-6));
    assert!(inv_frequencies(128, 1e4, &RopeScaling::Divisors(vec![1.0; 3])).is_err());
    assert_eq!(RopeScaling::from_config(None), Ok(RopeScaling::None));
    let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let err = RopeScaling::from_config(Some(&yarn)).unwrap_err();
    assert!(err.contains("yarn"), "{err}");
}

/// Random weights of a tiny two-layer Llama under their Hugging Face names, and its
/// config.json: `heads` heads (`kv_heads` kv heads) of `head_dim`.
fn tiny_weights(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> (serde_json::Value, HashMap<String, Tensor>) {
    let (hidden, kv, ffn, vocab) = (heads * head_dim, kv_heads * head_dim, 128, 100);
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    });
    let dev = Device::Cpu;
    let mut weights = HashMap::new();
    let mut put = |name: String, shape: &[usize]| {
        let t = match shape {
            [n] => Tensor::rand(0.5f32, 1.5, *n, &dev).unwrap(),
            [_, fan_in] => Tensor::randn(0f32, 1.2 / (*fan_in as f32).sqrt(), shape, &dev).unwrap(),
            _ => unreachable!("vectors and matrices"),
        };
        weights.insert(name, t);
    };
    put("model.embed_tokens.weight".into(), &[vocab, hidden]);
    put("model.norm.weight".into(), &[hidden]);
    put("lm_head.weight".into(), &[vocab, hidden]);
    for i in 0..2 {
        let p = |n: &str| format!("model.layers.{i}.{n}.weight");
        put(p("input_layernorm"), &[hidden]);
        put(p("post_attention_layernorm"), &[hidden]);
        put(p("self_attn.q_proj"), &[hidden, hidden]);
        put(p("self_attn.k_proj"), &[kv, hidden]);
        put(p("self_attn.v_proj"), &[kv, hidden]);
        put(p("self_attn.o_proj"), &[hidden, hidden]);
        put(p("mlp.gate_proj"), &[ffn, hidden]);
        put(p("mlp.up_proj"), &[ffn, hidden]);
        put(p("mlp.down_proj"), &[hidden, ffn]);
    }
    (config, weights)
}

/// A tiny checkpoint on disk: [`tiny_weights`] saved as safetensors beside a config.json.
fn tiny_checkpoint(
    dir: &Path,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> serde_json::Value {
    let (config, weights) = tiny_weights(heads, kv_heads, head_dim);
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    config
}

/// [`tiny_weights`] (4 heads over 2 kv heads of 64) as a GGUF file in a fresh folder `name`
/// (returned, with the open file), as llama.cpp's converter lays them out: the matrices in
/// Q4_1, the token embeddings (tied to the output) in Q8_0, the norms in f32.
fn tiny_gguf(name: &str) -> (std::path::PathBuf, GgufFile) {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let (config, weights) = tiny_weights(4, 2, 64);
    let mut names = vec![
        ("token_embd".to_string(), "model.embed_tokens".to_string()),
        ("output_norm".to_string(), "model.norm".to_string()),
    ];
    for i in 0..2 {
        for (gguf, hf) in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ] {
            names.push((format!("blk.{i}.{gguf}"), format!("model.layers.{i}.{hf}")));
        }
    }
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|(gguf, hf)| {
            let t = &weights[&format!("{hf}.weight")];
            let kind = match (t.rank(), gguf.as_str()) {
                (1, _) => GgmlDType::F32,
                (_, "token_embd") => GgmlDType::Q8_0,
                _ => GgmlDType::Q4_1,
            };
            (
                format!("{gguf}.weight"),
                QTensor::quantize(t, kind).unwrap(),
            )
        })
        .collect();
    let n = |key: &str| Value::U32(config[key].as_u64().unwrap() as u32);
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", n("num_attention_heads")),
        ("llama.attention.head_count_kv", n("num_key_value_heads")),
        ("llama.embedding_length", n("hidden_size")),
        ("llama.block_count", n("num_hidden_layers")),
        ("llama.context_length", n("max_position_embeddings")),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let dir = checkpoint_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    (dir, GgufFile::open(&path).unwrap())
}

/// Logits (on the host) of the last token of a `prompt_len`-token prompt and then of one
/// decoded token, through the paged KV cache on the model's device.
fn run(model: &Llama, prompt_len: usize) -> Vec<Vec<f32>> {
    let dev = model.device().clone();
    let cfg = model.config();
    let block_size = 16;
    let kv = KvCache::new(cfg, 8, block_size, cfg.dtype, &dev).unwrap();
    let table = vec![5u32, 0, 3, 6];
    let slot = |p: u32| table[p as usize / block_size] * block_size as u32 + p % 16;
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 37 + 3) % 100).collect();
    let seq = |start, len, ctx| SeqAttention {
        query_start: start,
        query_len: len,
        context_len: ctx,
        block_table: table.clone(),
        prompt_len,
    };
    let n = prompt_len as u32;
    let positions: Vec<u32> = (0..n).collect();
    let slots: Vec<u32> = positions.iter().map(|&p| slot(p)).collect();
    // The prompt in two chunks, as a long prompt goes: the first samples nothing, so it has
    // no logits; the second reads the first's keys and values from the cache.
    let half = prompt_len / 2;
    let chunk = Batch::new(
        &prompt[..half],
        &positions[..half],
        &slots[..half],
        vec![seq(0, half, half)],
        &[],
        vec![true; half],
        &dev,
    )
    .unwrap();
    let none = model.forward(&chunk, &kv).unwrap();
    assert_eq!(none.dims(), [0, cfg.vocab_size]);
    let rest = prompt_len - half;
    let prefill = Batch::new(
        &prompt[half..],
        &positions[half..],
        &slots[half..],
        vec![seq(0, rest, prompt_len)],
        &[rest as u32 - 1],
        vec![true; rest],
        &dev,
    )
    .unwrap();
    let first = model.forward(&prefill, &kv).unwrap();
    let decode = Batch::new(
        &[7],
        &[n],
        &[slot(n)],
        vec![seq(0, 1, prompt_len + 1)],
        &[0],
        vec![false],
        &dev,
    )
    .unwrap();
    let second = model.forward(&decode, &kv).unwrap();
    [first, second]
        .iter()
        .map(|l| {
            l.squeeze(0)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// `got` (bf16) within 10 % of `want` (f32), and its first choice about as good as f32's.
/// (bf16 keeps 8 bits of mantissa; through two layers of random weights its largest logit
/// error reached 7.6 % of the largest logit in 600 runs, so 5 % failed one run in 35.)
fn assert_follows(want: &[Vec<f32>], got: &[Vec<f32>], what: &str) {
    for (want, got) in want.iter().zip(got) {
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = want
            .iter()
            .zip(got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err < 0.1 * scale,
            "{what}: bf16 off by {err} (logits up to {scale})"
        );
        // The weights are random, so the two best logits may be closer than bf16 can tell
        // apart.
        let best = (0..got.len())
            .max_by(|&a, &b| got[a].total_cmp(&got[b]))
            .unwrap();
        let top = want.iter().fold(f32::MIN, |m, &x| m.max(x));
        assert!(
            want[best] >= top - 2. * err,
            "{what}: bf16's first choice trails by {}",
            top - want[best]
        );
    }
}

/// The first GPU; `None` without one (a test then passes without checking), but a panic with
/// `CANDELA_REQUIRE_GPU=1` (scripts/gpu-bench.sh), where a device that does not open fails.
fn gpu_or_skip() -> Option<Device> {
    match candela_kernels::cuda_device(0) {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var_os("CANDELA_REQUIRE_GPU").is_some_and(|v| v == "1") => {
            panic!("CANDELA_REQUIRE_GPU=1 but the CUDA device did not open: {e}")
        }
        Err(_) => None,
    }
}

fn checkpoint_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("candela-llama-{name}-{}", std::process::id()))
}

/// bf16 against f32 on the CPU: a small model, and the one the GPU test runs.
#[test]
fn bf16_follows_f32() {
    for (heads, kv_heads, head_dim, prompt_len) in [(4, 2, 16, 5), (4, 2, 64, 40)] {
        let dir = checkpoint_dir(&format!("cpu-{head_dim}"));
        let config = tiny_checkpoint(&dir, heads, kv_heads, head_dim);
        let load = |dtype| Llama::from_safetensors(&dir, &config, &Device::Cpu, dtype).unwrap();
        let (f32_model, bf16_model) = (load(DType::F32), load(DType::BF16));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(bf16_model.config().dtype, DType::BF16);
        let what = format!("head_dim {head_dim}");
        assert_follows(
            &run(&f32_model, prompt_len),
            &run(&bf16_model, prompt_len),
            &what,
        );
    }
}

/// A GGUF model computes in f32 on the CPU (candela's quantized kernel takes f32
/// activations) and refuses another dtype there by name.
#[test]
fn gguf_computes_in_f32_on_the_cpu() {
    let (dir, mut gguf) = tiny_gguf("gguf-cpu");
    let err = Llama::from_gguf(&mut gguf, &Device::Cpu, DType::BF16).err();
    assert!(
        err.as_ref().is_some_and(|e| e.to_string().contains("BF16")),
        "{err:?}"
    );
    let model = Llama::from_gguf(&mut gguf, &Device::Cpu, DType::F32).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(model.config().dtype, DType::F32);
    let logits = run(&model, 40);
    assert!(logits.iter().flatten().all(|x| x.is_finite()));
}

/// The whole forward pass on a GPU (stacked projections read as views, the tensor-core
/// prefill kernel, the decode kernel, fused norms and activations) in bf16, against f32 on
/// the CPU. Skips without a GPU (fails instead with `CANDELA_REQUIRE_GPU=1`).
#[test]
fn gpu_bf16_follows_cpu_f32() {
    let Some(gpu) = gpu_or_skip() else { return };
    let dir = checkpoint_dir("gpu");
    let config = tiny_checkpoint(&dir, 4, 2, 64);
    let cpu = Llama::from_safetensors(&dir, &config, &Device::Cpu, DType::F32).unwrap();
    let on_gpu = Llama::from_safetensors(&dir, &config, &gpu, DType::BF16).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_follows(&run(&cpu, 40), &run(&on_gpu, 40), "gpu");
}

/// A GGUF model on a GPU in bf16 (its matrices through candle's quantized kernels in f32,
/// everything else through candela's bf16 kernels) against the same file in f32 on the CPU.
#[test]
fn gpu_gguf_bf16_follows_cpu_f32() {
    let Some(gpu) = gpu_or_skip() else { return };
    let (dir, mut gguf) = tiny_gguf("gguf-gpu");
    let cpu = Llama::from_gguf(&mut gguf, &Device::Cpu, DType::F32).unwrap();
    let on_gpu = Llama::from_gguf(&mut gguf, &gpu, DType::BF16).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(on_gpu.config().dtype, DType::BF16);
    assert_follows(&run(&cpu, 40), &run(&on_gpu, 40), "gguf on the gpu");
}
