"""Reference log-probs for a partial rotary width that is odd: a tiny Qwen3-Next with head_dim 20 and
partial_rotary_factor 0.25, so transformers' rotary `dim` is 5. `inv_freq = base ** -(arange(0, 5, 2) / 5)`
has 3 entries and the cos/sin tables `cat(freqs, freqs)` are 6 wide, so transformers rotates 6 channels
of each head (`apply_rotary_pos_emb` slices `q[..., :cos.shape[-1]]`) with exponents 0, 2/5, 4/5.

Run with the bench venv: benches/.venv/bin/python scripts/gen-odd-rotary-reference.py
Writes tests/fixtures/hybrid_unseen/qwen3_next_rot5/{config.json, generation_config.json, model.safetensors,
reference.json, logprobs_input.jsonl}. See tests/fixtures/hybrid_unseen/README.md.
"""
import json, os, platform, random, shutil

import torch
import transformers
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next import modeling_qwen3_next

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "tests/fixtures/hybrid_unseen/qwen3_next_rot5")
SEED = 2401
CASE_LENGTHS = [5, 40, 70]
ROPE = modeling_qwen3_next.Qwen3NextRotaryEmbedding


def r9(x):
    return float(f"{float(x):.9g}")


def config():
    # dense (every layer in mlp_only_layers), two full-attention layers so RoPE acts twice;
    # rope_theta 100 so that all three frequencies turn noticeably within the cases' lengths
    return Qwen3NextConfig(
        vocab_size=256, hidden_size=40, intermediate_size=64, num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, num_attention_heads=2, num_key_value_heads=1, head_dim=20,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.25},
        num_experts=2, num_experts_per_tok=1, mlp_only_layers=[0, 1, 2, 3], moe_intermediate_size=16,
        shared_expert_intermediate_size=16, rms_norm_eps=1e-6, max_position_embeddings=256,
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def build():
    torch.manual_seed(SEED)
    cfg = config()
    cfg._attn_implementation = "eager"
    model = Qwen3NextForCausalLM(cfg).float()
    gen = torch.Generator().manual_seed(SEED + 100000)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias") or n.endswith("dt_bias") or n.endswith("A_log"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    return model


def load(dtype=torch.float32):
    return Qwen3NextForCausalLM.from_pretrained(OUT, dtype=dtype, attn_implementation="eager").eval()


def logprobs(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(2, x[:, 1:, None]).squeeze(2)[0]


def with_rope(dim_of, ids_list):
    """log-probs when the rotary tables are built for another `dim` (what a port that rounds the odd
    width to an even one would compute), to show the fixture tells them apart."""
    original = ROPE.compute_default_rope_parameters

    def patched(cfg, device=None, **kw):
        base = cfg.rope_parameters["rope_theta"]
        dim = dim_of(int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"]))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    ROPE.compute_default_rope_parameters = staticmethod(patched)
    try:
        m = load()
        return [logprobs(m, ids) for ids in ids_list]
    finally:
        ROPE.compute_default_rope_parameters = staticmethod(original)


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    build().save_pretrained(OUT, safe_serialization=True)
    for fn in os.listdir(OUT):
        os.chmod(os.path.join(OUT, fn), 0o644)
    m32, m64 = load(), load(torch.float64)
    rotary = m32.model.rotary_emb
    assert rotary.inv_freq.numel() == 3, rotary.inv_freq
    cos, _ = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(4)[None])
    assert cos.shape[-1] == 6, cos.shape
    rng = random.Random(SEED)
    cases, spread = [], 0.0
    for n in CASE_LENGTHS:
        ids = [rng.randrange(3, 256) for _ in range(n)]
        lp, lp64 = logprobs(m32, ids), logprobs(m64, ids)
        spread = max(spread, (lp.double() - lp64).abs().max().item())
        cases.append({"name": f"seq{n}", "input_ids": [ids], "logprobs": [[r9(v) for v in lp.tolist()]]})
    ids_list = [c["input_ids"][0] for c in cases]
    right = [logprobs(m32, ids) for ids in ids_list]
    wrong = {label: max((a - b).abs().max().item() for a, b in zip(right, with_rope(f, ids_list)))
             for label, f in (("rounded_down_to_4", lambda d: d - d % 2), ("rounded_up_to_6", lambda d: d + d % 2))}
    ref = {
        "model_name": "qwen3_next_rot5", "hf_class": "Qwen3NextForCausalLM", "seed": SEED,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "layer_types": list(m32.config.layer_types),
        "rotary": {"head_dim": 20, "partial_rotary_factor": 0.25, "dim": 5,
                   "inv_freq": rotary.inv_freq.tolist(), "rotated_channels": int(cos.shape[-1])},
        "logprobs_definition": "logprobs[b][t] = log_softmax(logits[b][t])[input_ids[b][t+1]], t=0..T-2 (float32, 9 sig. digits)",
        "forward": "model(input_ids=..., use_cache=False), no attention_mask, eval mode, attention eager",
        "cases": cases,
        "f64_spread": {"max_abs_logprob_diff": spread},
        "other_rotary_dims_max_abs_logprob_diff": wrong,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "logprobs_input.jsonl"), "w") as f:
        for c in cases:
            f.write(json.dumps({"ids": c["input_ids"][0]}) + "\n")
    print(json.dumps({"f64_spread": spread, "inv_freq": ref["rotary"]["inv_freq"], "other_dims": wrong}))


if __name__ == "__main__":
    main()
