"""Reference trajectories for `dreamloop train` / `Trainer`: PyTorch eager with TRL's loss
semantics and torch.optim.AdamW, on the tiny fixture model `tests/fixtures/models/llama_untied`.

SFT loss = sum of completion-token NLL over the batch / number of completion tokens in the
batch (TRL SFTTrainer, completion_only_loss). DPO (sigmoid) loss = mean over pairs of
-logsigmoid(beta*((pc-rc)-(pr-rr))) with summed completion log-probs, reference = the frozen
starting weights. AdamW groups as HF's Trainer: weight decay on 2-D tensors only.
Constant lr, no clipping.

Run with the bench venv: benches/.venv/bin/python scripts/gen-train-reference.py
Writes tests/fixtures/train_reference/{sft,dpo}.jsonl and {sft,dpo}_after.safetensors.

With --f64 it runs the same steps in float64 from the same (float32) start weights instead and
writes only {sft,dpo}_after_f64.safetensors (the float64 result rounded to float32) and
f64_reference.json: the exact trajectory that `actors/tests/train_cli.rs` compares dreamloop
with, its tolerance being derived from how far the float32 run above lands from it.
"""
import json, os, random, sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODEL = os.path.join(ROOT, "tests/fixtures/models/llama_untied")
OUT = os.path.join(ROOT, "tests/fixtures/train_reference")
LR, WD, BETA, BATCH = 1e-3, 0.01, 0.1, 2
F64 = sys.argv[1:] == ["--f64"]
assert F64 or not sys.argv[1:], "usage: gen-train-reference.py [--f64]"
DTYPE = torch.float64 if F64 else torch.float32
torch.manual_seed(0)
rng = random.Random(1234)

def ids(n):
    return [rng.randrange(3, 256) for _ in range(n)]

sft = [{"prompt": ids(rng.randrange(3, 9)), "completion": ids(rng.randrange(2, 7))} for _ in range(5)]
dpo = [{"prompt": ids(rng.randrange(3, 9)), "chosen": ids(rng.randrange(2, 7)), "rejected": ids(rng.randrange(2, 7))} for _ in range(5)]

def load():
    m = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=DTYPE)
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
    logits = logits if logits.dtype == torch.float64 else logits.float()  # the f64 run stays f64
    logp = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    score = torch.zeros_like(logp)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        score[b, len(p) - 1: len(p) - 1 + len(c)] = 1.0
    return logp, score

ROUNDING = [0.0]


def save(model, name):
    if F64:
        name = name.replace("_after", "_after_f64")
        exact = {k: v.detach() for k, v in model.state_dict().items()}
        tensors = {k: v.float().contiguous() for k, v in exact.items()}
        ROUNDING[0] = max([ROUNDING[0]] + [(exact[k] - tensors[k].double()).abs().max().item() for k in exact])
    else:
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(OUT, name), metadata={"format": "pt"})

os.makedirs(OUT, exist_ok=True)
lines = {"sft": [json.dumps({"input_ids": e["prompt"] + e["completion"],
                             "completion_mask": [0] * len(e["prompt"]) + [1] * len(e["completion"])}) + "\n"
                 for e in sft],
         "dpo": [json.dumps({"prompt_input_ids": e["prompt"], "chosen_input_ids": e["chosen"],
                             "rejected_input_ids": e["rejected"]}) + "\n" for e in dpo]}
for kind, text in lines.items():
    path = os.path.join(OUT, f"{kind}.jsonl")
    if F64:  # the float32 run's data, drawn by the same rng: check it, do not rewrite it
        assert open(path).read() == "".join(text), f"{path} is not what this script draws"
    else:
        with open(path, "w") as f:
            f.write("".join(text))

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
if F64:
    with open(os.path.join(OUT, "f64_reference.json"), "w") as f:
        json.dump({"note": "the same steps in float64 from the float32 start weights; "
                           "{sft,dpo}_after_f64.safetensors hold the result rounded to float32",
                   "losses_float64": losses, "rounding_to_float32_max_abs": ROUNDING[0],
                   "torch": torch.__version__}, f, indent=1)
        f.write("\n")
else:
    with open(os.path.join(OUT, "losses.json"), "w") as f:
        json.dump({"lr": LR, "weight_decay": WD, "beta": BETA, "batch_size": BATCH, "losses": losses,
                   "torch": torch.__version__}, f, indent=1)
print(json.dumps(losses))
