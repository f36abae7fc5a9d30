"""Reference trajectories for `dreamloop train` / `Trainer`: PyTorch eager with TRL's loss
semantics and torch.optim.AdamW, on the tiny fixture model `tests/fixtures/models/llama_untied`.

SFT loss = sum of completion-token NLL over the batch / number of completion tokens in the
batch (TRL SFTTrainer, completion_only_loss). DPO (sigmoid) loss = mean over pairs of
-logsigmoid(beta*((pc-rc)-(pr-rr))) with summed completion log-probs, reference = the frozen
starting weights. AdamW groups as HF's Trainer: weight decay on 2-D tensors only.
Constant lr, no clipping.

Run with the bench venv: benches/.venv/bin/python scripts/gen-train-reference.py
Writes tests/fixtures/train_reference/{sft,dpo}.jsonl and {sft,dpo}_after.safetensors.
"""
import json, os, random

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODEL = os.path.join(ROOT, "tests/fixtures/models/llama_untied")
OUT = os.path.join(ROOT, "tests/fixtures/train_reference")
LR, WD, BETA, BATCH = 1e-3, 0.01, 0.1, 2
torch.manual_seed(0)
rng = random.Random(1234)

def ids(n):
    return [rng.randrange(3, 256) for _ in range(n)]

sft = [{"prompt": ids(rng.randrange(3, 9)), "completion": ids(rng.randrange(2, 7))} for _ in range(5)]
dpo = [{"prompt": ids(rng.randrange(3, 9)), "chosen": ids(rng.randrange(2, 7)), "rejected": ids(rng.randrange(2, 7))} for _ in range(5)]

def load():
    m = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    m.train()
    return m

def optimizer(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, betas=(0.9, 0.999), eps=1e-8, foreach=False)

def padded(seqs):
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return input_ids, mask

def completion_logps(model, prompts, completions):
    seqs = [p + c for p, c in zip(prompts, completions)]
    input_ids, mask = padded(seqs)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    score = torch.zeros_like(logp)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        score[b, len(p) - 1: len(p) - 1 + len(c)] = 1.0
    return logp, score

def save(model, name):
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(OUT, name), metadata={"format": "pt"})

os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "sft.jsonl"), "w") as f:
    for e in sft:
        f.write(json.dumps({"input_ids": e["prompt"] + e["completion"],
                            "completion_mask": [0] * len(e["prompt"]) + [1] * len(e["completion"])}) + "\n")
with open(os.path.join(OUT, "dpo.jsonl"), "w") as f:
    for e in dpo:
        f.write(json.dumps({"prompt_input_ids": e["prompt"], "chosen_input_ids": e["chosen"],
                            "rejected_input_ids": e["rejected"]}) + "\n")

losses = {"sft": [], "dpo": []}
model = load()
opt = optimizer(model)
for i in range(0, len(sft), BATCH):
    chunk = sft[i:i + BATCH]
    logp, score = completion_logps(model, [e["prompt"] for e in chunk], [e["completion"] for e in chunk])
    loss = -(logp * score).sum() / score.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses["sft"].append(loss.item())
save(model, "sft_after.safetensors")

model = load()
reference = load().eval()
opt = optimizer(model)
for i in range(0, len(dpo), BATCH):
    chunk = dpo[i:i + BATCH]
    prompts = [e["prompt"] for e in chunk] * 2
    comps = [e["chosen"] for e in chunk] + [e["rejected"] for e in chunk]
    logp, score = completion_logps(model, prompts, comps)
    sums = (logp * score).sum(1)
    with torch.no_grad():
        rlogp, rscore = completion_logps(reference, prompts, comps)
        rsums = (rlogp * rscore).sum(1)
    n = len(chunk)
    logits = (sums[:n] - sums[n:]) - (rsums[:n] - rsums[n:])
    loss = -F.logsigmoid(BETA * logits).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses["dpo"].append(loss.item())
save(model, "dpo_after.safetensors")
with open(os.path.join(OUT, "losses.json"), "w") as f:
    json.dump({"lr": LR, "weight_decay": WD, "beta": BETA, "batch_size": BATCH, "losses": losses,
               "torch": torch.__version__}, f, indent=1)
print(json.dumps(losses))
