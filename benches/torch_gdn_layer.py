"""Forward + backward of one Gated-DeltaNet layer and one gated full-attention layer of
transformers' Qwen3.5 (pure-torch fallbacks: torch_chunk_gated_delta_rule, causal_conv1d_fn; eager
attention), f32, CPU, batch 1 — the comparison point for benches/hybrid_layer.rs, same shapes
(hidden 512; GDN 4 key / 8 value heads of 64, conv 4; attention 8 heads / 2 kv heads of 64,
partial RoPE 0.25). Token mixer only, loss = mean(out²). Prints one JSON line per length:
best of 2 after a warm-up."""
import json, logging, os, sys, time, warnings

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from transformers import Qwen3_5TextConfig  # noqa: E402
from transformers.models.qwen3_5 import modeling_qwen3_5 as m  # noqa: E402

lengths = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [256, 1024, 4096]
torch.manual_seed(0)
torch.set_num_threads(os.cpu_count())
cfg = Qwen3_5TextConfig(
    vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"], num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
    linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "mrope_section": [3, 3, 2], "mrope_interleaved": True},
)
cfg._attn_implementation = "eager"
gdn = m.Qwen3_5GatedDeltaNet(cfg, 0).float()
attn = m.Qwen3_5Attention(cfg, 1).float()
rope = m.Qwen3_5TextRotaryEmbedding(cfg)


def run(which, seq):
    x = torch.randn(1, seq, 512, requires_grad=True)
    t0 = time.perf_counter()
    if which == "gdn":
        out = gdn(x)
    else:
        pos = torch.arange(seq)[None].expand(3, 1, seq)
        cos, sin = rope(x, pos)
        mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
        out, _ = attn(x, (cos, sin), mask)
    out.pow(2).mean().backward()
    return time.perf_counter() - t0


for seq in lengths:
    for which in ("gdn", "attention"):
        run(which, seq)
        best = min(run(which, seq) for _ in range(2))
        print(json.dumps({"impl": f"torch {torch.__version__}", "what": which, "seq": seq,
                          "seconds": best}), flush=True)
