"""One SFT step (forward + backward + AdamW) of a SmolLM2-135M-shaped llama in PyTorch eager,
f32, CPU — the comparison point for benches/model_step.rs. Prints one JSON line."""
import json, os, resource, sys, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

batch, seq, steps = (int(a) for a in sys.argv[1:4]) if len(sys.argv) >= 4 else (4, 256, 2)
torch.manual_seed(0)
torch.set_num_threads(os.cpu_count())
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                  rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)
model = LlamaForCausalLM(cfg).float().train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-8, weight_decay=0.0)
ids = torch.randint(0, cfg.vocab_size, (batch, seq))

def step():
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, time.perf_counter() - t0

step()  # warm-up
fb, full = zip(*(step() for _ in range(steps)))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"impl": f"torch {torch.__version__} eager", "threads": torch.get_num_threads(),
                  "fwd_bwd_s": min(fb), "sft_step_s": min(full),
                  "tokens_per_s": batch * seq / min(full), "peak_rss_bytes": rss}))
