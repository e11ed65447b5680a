#!/usr/bin/env python3
"""Helpers of scripts/gpu-check.sh (run on a lent GPU machine; see docs/performance.md).

    gpu_check.py write-model DIR SHAPE [--dtype bf16|f32] [--seed S]
        A random-weight Hugging Face checkpoint (config.json, tokenizer.json,
        tokenizer_config.json, model.safetensors). SHAPE: tiny-qwen2, tiny-llama, or
        qwen2.5-math-1.5b or qwen2.5-math-7b (those models' configs). The tokenizer is byte-level BPE
        over the 256 byte symbols plus ChatML specials, so every framework tokenises a
        text to the same ids.
    gpu_check.py compare-samples A.jsonl B.jsonl
        Agreement of two `spur sample --json` outputs (same prompts, greedy): share of
        identical completions, and the largest log-prob gap over their common prefix.
    gpu_check.py hf-generate DIR --prompt TEXT [--batches 1,64] [--max-tokens 128] [--dtype]
        transformers `generate`, greedy, batch copies of the prompt, prefill included:
        the same measurement as `spur bench generate`.
    gpu_check.py torch-update DIR [--rollouts 16] [--prompt-tokens 111]
                 [--completion-tokens 512] [--micro-batch 4] [--dtype bf16|f32|tf32]
        One GRPO update step in PyTorch on the same shapes and objective as
        `spur bench update` (token-mean PPO-clip loss, Adam betas (0.9, 0.95), grad clip 1).

Each command prints one JSON object on stdout. Weights are written with numpy (or torch,
where present, for speed); `compare-samples` and `write-model` need no torch.
"""

import argparse
import json
import math
import os
import struct
import sys
import time

# Where the PyTorch runs go; cpu only to try this script on a machine without a GPU.
TORCH_DEVICE = os.environ.get("GPU_CHECK_TORCH_DEVICE", "cuda")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SHAPES = {
    "tiny-qwen2": dict(model_type="qwen2", arch="Qwen2ForCausalLM", vocab_size=272,
                       hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
                       init_std=0.2),
    "tiny-llama": dict(model_type="llama", arch="LlamaForCausalLM", vocab_size=272,
                       hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
                       init_std=0.2),
    # Qwen/Qwen2.5-Math-1.5B's config.json. The tiny models have head_dim 64, the smallest
    # that mistral.rs's paged-attention kernels take, and a larger init_std, which gives peaked
    # next-token distributions, so that greedy choices are rarely near-ties.
    "qwen2.5-math-1.5b": dict(model_type="qwen2", arch="Qwen2ForCausalLM", vocab_size=151936,
                              hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2,
                              tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                              init_std=0.02),
    # Qwen/Qwen2.5-Math-7B's config.json (7.6 B parameters, untied head).
    "qwen2.5-math-7b": dict(model_type="qwen2", arch="Qwen2ForCausalLM", vocab_size=152064,
                            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4,
                            tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
                            init_std=0.02),
}


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def parameter_shapes(s):
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    d = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * d
    bias = s["model_type"] == "qwen2"
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)),
                   (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
        if bias:
            shapes += [(p + "self_attn.q_proj.bias", (h,)),
                       (p + "self_attn.k_proj.bias", (kv,)),
                       (p + "self_attn.v_proj.bias", (kv,))]
    shapes.append(("model.norm.weight", (h,)))
    if not s["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def random_bytes(shape, norm, seed, dtype, std):
    """Little-endian bytes of N(0, std²) values (1 for norm weights) in dtype."""
    n = math.prod(shape)
    try:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator(device=dev).manual_seed(seed)
        t = (torch.ones(n, device=dev) if norm
             else torch.randn(n, generator=g, device=dev) * std)
        t = t.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        return t.view(torch.int16 if dtype == "bf16" else torch.int32).cpu().numpy().tobytes()
    except ImportError:
        import numpy as np

        x = (np.ones(n, np.float32) if norm
             else np.random.default_rng(seed).standard_normal(n, np.float32) * std)
        if dtype == "bf16":  # round to nearest even on the upper 16 bits
            u = x.view(np.uint32)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            return u.astype("<u2").tobytes()
        return x.astype("<f4").tobytes()


def write_safetensors(path, tensors, dtype):
    """tensors: list of (name, shape, bytes)."""
    header, offset = {}, 0
    code = {"bf16": "BF16", "f32": "F32"}[dtype]
    for name, shape, data in tensors:
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, data in tensors:
            f.write(data)
    os.replace(tmp, path)


def write_model(args):
    s = SHAPES[args.shape]
    os.makedirs(args.dir, exist_ok=True)
    tok = byte_level_tokenizer()
    tok.save(os.path.join(args.dir, "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    with open(os.path.join(args.dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}, f)
    config = {k: v for k, v in s.items() if k not in ("arch", "init_std")}
    # No pad_token_id: transformers would make that embedding row a padding_idx, which gets
    # no gradient, and the update-step gradients would no longer be comparable.
    config.update(architectures=[s["arch"]], hidden_act="silu",
                  head_dim=s["hidden_size"] // s["num_attention_heads"],
                  max_position_embeddings=4096, eos_token_id=eos, bos_token_id=None,
                  use_cache=True,
                  torch_dtype={"bf16": "bfloat16", "f32": "float32"}[args.dtype])
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tensors = [(name, shape, random_bytes(shape, name.endswith("norm.weight"),
                                          args.seed * 1000 + i, args.dtype,
                                          args.init_std or s["init_std"]))
               for i, (name, shape) in enumerate(parameter_shapes(s))]
    write_safetensors(os.path.join(args.dir, "model.safetensors"), tensors, args.dtype)
    params = sum(math.prod(shape) for _, shape, _ in tensors)
    print(json.dumps({"dir": args.dir, "shape": args.shape, "parameters": params}))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare_samples(args):
    a, b = read_jsonl(args.a), read_jsonl(args.b)
    if len(a) != len(b):
        sys.exit(f"{args.a} has {len(a)} samples, {args.b} {len(b)}")
    identical, max_gap, tokens, first_split = 0, 0.0, 0, []
    for x, y in zip(a, b):
        same = 0
        for tx, ty in zip(x["token_ids"], y["token_ids"]):
            if tx != ty:
                break
            same += 1
        identical += x["token_ids"] == y["token_ids"]
        if x["token_ids"] != y["token_ids"]:
            first_split.append(same)
        for lx, ly in zip(x["logprobs"][:same], y["logprobs"][:same]):
            max_gap = max(max_gap, abs(lx - ly))
        tokens += same
    print(json.dumps({"samples": len(a), "identical": identical,
                      "common_prefix_tokens": tokens, "max_logprob_gap": max_gap,
                      "first_split_positions": first_split}))


def sync():
    import torch

    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "f32": torch.float32, "tf32": torch.float32}[name]


def load_hf(path, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(TORCH_DEVICE)


def hf_generate(args):
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.dir, "tokenizer.json"))
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    t0 = time.perf_counter()
    model = load_hf(args.dir, args.dtype).eval()
    load_s = time.perf_counter() - t0
    runs = []
    with torch.inference_mode():
        for batch in [1] + args.batches:  # the first run warms up
            x = torch.tensor([ids] * batch, device=TORCH_DEVICE)
            sync()
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                 pad_token_id=0)
            sync()
            seconds = time.perf_counter() - t0
            new = out.shape[1] - len(ids)
            runs.append({"batch": batch, "tokens": batch * new, "seconds": seconds,
                         "tok_s": batch * new / seconds,
                         "first_token_ids": out[0, len(ids):].tolist()})
    print(json.dumps({"engine": "transformers", "dtype": args.dtype, "load_s": load_s,
                      "prompt_tokens": len(ids), "max_tokens": args.max_tokens,
                      "torch": torch.__version__, "runs": runs[1:]}))


def matmul_peak(dtype):
    import torch

    best = 0.0
    for n in (4096, 8192) if TORCH_DEVICE == "cuda" else (256,):
        a = torch.randn(n, n, device=TORCH_DEVICE, dtype=dtype)
        b = torch.randn(n, n, device=TORCH_DEVICE, dtype=dtype)
        a @ b
        sync()
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                a @ b
            sync()
            best = max(best, 2 * n**3 * 20 / (time.perf_counter() - t0))
    return best


def splitmix64(x):
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def bench_token_ids(args, vocab):
    """`spur bench update`'s tokens: id i (from 1, over each group's prompt, then its
    completions) is splitmix64(i) mod vocab; groups of four."""
    counter = iter(range(1, 1 << 62))
    ids = lambda n: [splitmix64(next(counter)) % vocab for _ in range(n)]
    rows = []
    for _ in range(args.rollouts // 4):
        prompt = ids(args.prompt_tokens)
        rows += [prompt + ids(args.completion_tokens) for _ in range(4)]
    return rows


def torch_update(args):
    """The step of spur's trainer: old log-probs from a no-grad pass, then one Adam update
    over the whole rollout in micro-batches (token-mean loss per micro-batch, averaged)."""
    import torch

    if args.rollouts % 4:
        sys.exit("--rollouts must be a multiple of 4 (groups of four, as in spur bench update)")
    torch.manual_seed(1)
    peak_bf16 = matmul_peak(torch.bfloat16)
    # f32 master weights; bf16 runs the forward/backward under autocast (mixed precision).
    model = load_hf(args.dir, "tf32" if args.dtype == "tf32" else "f32").train()
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    autocast = torch.autocast(TORCH_DEVICE, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    length = args.prompt_tokens + args.completion_tokens
    seqs = torch.tensor(bench_token_ids(args, vocab), device=TORCH_DEVICE)
    rewards = torch.tensor([float(i % 4 % 3 == 0) for i in range(args.rollouts)], device=TORCH_DEVICE)
    groups = rewards.view(-1, 4)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-9)).view(-1)

    def token_logprobs(batch):
        with autocast:
            logits = model(batch).logits[:, args.prompt_tokens - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, batch[:, args.prompt_tokens:, None])[..., 0]

    opt = torch.optim.Adam(model.parameters(), lr=5e-7, betas=(0.9, 0.95), eps=1e-8)
    micro = [slice(i, i + args.micro_batch) for i in range(0, args.rollouts, args.micro_batch)]
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        old = torch.cat([token_logprobs(seqs[m]) for m in micro])
    sync()
    score_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for m in micro:
        ratio = torch.exp(token_logprobs(seqs[m]) - old[m])
        a = adv[m][:, None]
        loss = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a).mean() / len(micro)
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sync()
    step_s = time.perf_counter() - t0
    tokens = args.rollouts * length
    achieved = 6 * params * tokens / step_s
    print(json.dumps({"engine": "pytorch", "dtype": args.dtype, "torch": torch.__version__,
                      "parameters": params, "rollouts": args.rollouts, "tokens": tokens,
                      "micro_batch": args.micro_batch, "score_s": score_s, "step_s": step_s,
                      "tokens_per_s": tokens / step_s, "flops_per_s": achieved,
                      "peak_bf16_flops_per_s": peak_bf16, "mfu_bf16": achieved / peak_bf16,
                      "grad_norm": float(grad_norm),
                      "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9
                      if TORCH_DEVICE == "cuda" else None}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-model")
    w.add_argument("dir")
    w.add_argument("shape", choices=sorted(SHAPES))
    w.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--init-std", type=float, help="weights' std (default: the shape's)")
    c = sub.add_parser("compare-samples")
    c.add_argument("a")
    c.add_argument("b")
    g = sub.add_parser("hf-generate")
    g.add_argument("dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--dtype", choices=["bf16", "f32", "tf32"], default="bf16")
    u = sub.add_parser("torch-update")
    u.add_argument("dir")
    u.add_argument("--rollouts", type=int, default=16)
    u.add_argument("--prompt-tokens", type=int, default=111)
    u.add_argument("--completion-tokens", type=int, default=512)
    u.add_argument("--micro-batch", type=int, default=4)
    u.add_argument("--dtype", choices=["bf16", "f32", "tf32"], default="bf16")
    args = p.parse_args()
    {"write-model": write_model, "compare-samples": compare_samples,
     "hf-generate": hf_generate, "torch-update": torch_update}[args.command](args)


if __name__ == "__main__":
    main()
