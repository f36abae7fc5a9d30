"""Reference outputs for the hybrid Gated-DeltaNet decoders (qwen3_next, qwen3_5) on tiny random
models whose shapes differ from the shared fixtures ("unseen" architectures), plus training
trajectories made exactly like `scripts/gen-train-reference.py` (TRL loss semantics,
torch.optim.AdamW with HF-Trainer decay groups, constant lr, no clipping).

Run with the bench venv: benches/.venv/bin/python scripts/gen-hybrid-reference.py
Writes tests/fixtures/hybrid_unseen/<model>/{config.json, model.safetensors, generation_config.json,
reference.json, logprobs_input.jsonl} for qwen3_5_odd, qwen3_next_r3, qwen3_5_vl and
<model>/train/{sft,dpo}.jsonl, {sft,dpo}_after.safetensors, losses.json for the first two.
See tests/fixtures/hybrid_unseen/README.md.
"""
import copy, json, logging, os, platform, random, shutil, sys, tempfile

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import transformers
from transformers import (AutoModelForCausalLM, Qwen3_5Config, Qwen3_5ForCausalLM,
                          Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig, Qwen3NextConfig,
                          Qwen3NextForCausalLM)
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_next import modeling_qwen3_next

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "tests/fixtures/hybrid_unseen")
ATTN = "eager"
EXPERTS = "eager"  # the per-expert python loop (transformers 5.23's default is grouped_mm, float32-only on CPU)
LR, WD, BETA, BATCH = 1e-3, 0.01, 0.1, 2
CASE_LENGTHS = [5, 64, 70, 131]
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def r9(x):
    """float32 printed with 9 significant digits (round-trips exactly)."""
    return float(f"{float(x):.9g}")


# ---------------------------------------------------------------------------------------------
# GDN kernel-path bookkeeping: count calls of transformers' module-level functions (the torch
# fallbacks when fla / causal_conv1d / kernels are absent) and collect fallback warnings.
KERNEL_FUNCS = ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                "causal_conv1d_fn", "causal_conv1d_update"]
CALLS = {}


def _count(modname, fname, fn):
    def wrapped(*a, **k):
        CALLS[f"{modname}.{fname}"] = CALLS.get(f"{modname}.{fname}", 0) + 1
        return fn(*a, **k)
    return wrapped


KERNEL_INFO = {}
for mod in (modeling_qwen3_next, modeling_qwen3_5):
    short = mod.__name__.rsplit(".", 1)[1]
    for fname in KERNEL_FUNCS:
        fn = getattr(mod, fname)
        KERNEL_INFO[f"{short}.{fname}"] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fname)}"
        setattr(mod, fname, _count(short, fname, fn))
import importlib.util
KERNEL_INFO.update({f"{m}_importable": importlib.util.find_spec(m) is not None
                    for m in ("fla", "causal_conv1d", "kernels")})


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


CAPTURE = Capture()
logging.getLogger("transformers").addHandler(CAPTURE)


# ---------------------------------------------------------------------------------------------
# Models
def qwen3_5_odd_config():
    return Qwen3_5TextConfig(
        vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention",
                     "full_attention"],
        linear_num_key_heads=1, linear_num_value_heads=3, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_conv_kernel_dim=3, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                         "mrope_interleaved": True, "mrope_section": [2, 1, 1]},
        rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)


def qwen3_next_r3_config():
    # no layer_types: the layout comes from full_attention_interval (popped in __post_init__)
    return Qwen3NextConfig(
        vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=6, full_attention_interval=3,
        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        num_experts=3, num_experts_per_tok=2, norm_topk_prob=False, moe_intermediate_size=24,
        shared_expert_intermediate_size=20, decoder_sparse_step=1, mlp_only_layers=[1, 4],
        rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)


def qwen3_5_vl_config():
    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_interleaved": True, "mrope_section": [2, 1, 1]},
        rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  initializer_range=0.1)
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)


MODELS = {
    "qwen3_5_odd": dict(cls=Qwen3_5ForCausalLM, config=qwen3_5_odd_config, seed=2101, train=True,
                        expect_layer_types=["linear_attention", "full_attention", "linear_attention",
                                            "linear_attention", "full_attention"]),
    "qwen3_next_r3": dict(cls=Qwen3NextForCausalLM, config=qwen3_next_r3_config, seed=2201, train=True,
                          expect_layer_types=["linear_attention", "linear_attention", "full_attention"] * 2),
    "qwen3_5_vl": dict(cls=Qwen3_5ForConditionalGeneration, config=qwen3_5_vl_config, seed=2301, train=False,
                       expect_layer_types=["linear_attention"] * 3 + ["full_attention"]),
}
MTP_EXTRA = {"mtp.fc.weight": (64, 128), "mtp.norm.weight": (64,), "mtp.pre_fc_norm_embedding.weight": (64,),
             "mtp.pre_fc_norm_hidden.weight": (64,)}


def is_constant_init(name):
    return ("norm" in name or name.endswith(".bias") or name.endswith("dt_bias")
            or name.endswith("A_log"))


def build(name, spec, seed):
    torch.manual_seed(seed)
    cfg = spec["config"]()
    cfg._attn_implementation = ATTN
    if spec["cls"] is Qwen3NextForCausalLM:
        cfg._experts_implementation = EXPERTS
    model = spec["cls"](cfg).float()
    gen = torch.Generator().manual_seed(seed + 100000)
    perturbed = []
    with torch.no_grad():
        for n, p in model.named_parameters():  # named_parameters skips the tied lm_head alias
            if is_constant_init(n):
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
                perturbed.append(n)
            if name == "qwen3_5_vl" and ".visual." in f".{n}":
                p.copy_(p.to(torch.bfloat16).float())  # exactly representable in the bf16 file
        for n, p in model.named_parameters():
            assert p.numel() == 1 or p.std() > 0, f"{n} is constant"
    return model, perturbed


def load(path, cls, dtype=torch.float32, **kw):
    if cls is Qwen3NextForCausalLM:
        kw.setdefault("experts_implementation", EXPERTS)
    return cls.from_pretrained(path, dtype=dtype, attn_implementation=ATTN, **kw)


def layer_types_of(model):
    cfg = model.config.get_text_config()
    return list(cfg.layer_types)


# ---------------------------------------------------------------------------------------------
# Forward helpers
class RouterTap:
    """Records router logits of every Qwen3NextTopKRouter call (for the top-2 vs 3rd margin)."""

    def __init__(self, model):
        self.logits = []
        self.handles = [m.register_forward_hook(self.hook) for m in model.modules()
                        if isinstance(m, modeling_qwen3_next.Qwen3NextTopKRouter)]

    def hook(self, mod, inp, out):
        self.logits.append(out[0].detach())

    def margin(self, valid=None):
        """min over recorded tokens of p[k-1] - p[k] (k = top_k = 2). With `valid` (a flat [B*T] bool
        mask) only the first forward's calls (one per MoE layer) are used, restricted to valid rows."""
        best = float("inf")
        logits = self.logits if valid is None else self.logits[:len(self.handles)]
        for lg in logits:
            p = torch.softmax(lg.float(), dim=-1).sort(dim=-1, descending=True).values
            gap = p[:, 1] - p[:, 2]
            if valid is not None:
                assert gap.shape == valid.shape
                gap = gap[valid]
            best = min(best, gap.min().item())
        return best

    def clear(self):
        self.logits = []

    def remove(self):
        for h in self.handles:
            h.remove()


def case_logprobs(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, labels=x, use_cache=False)
    logits = out.logits.double() if out.logits.dtype == torch.float64 else out.logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, x[:, 1:, None]).squeeze(2)
    return lp, out.loss, logits


def make_reference(name, spec, model_dir, rng):
    cls = spec["cls"]
    m32 = load(model_dir, cls)
    m64 = load(model_dir, cls, dtype=torch.float64)
    m32.eval(); m64.eval()
    tap, tap64 = RouterTap(m32), RouterTap(m64)
    cases, spread_lp, spread_logit, spread_loss = [], 0.0, 0.0, 0.0
    for n in CASE_LENGTHS:
        ids = [rng.randrange(3, 256) for _ in range(n)]
        lp, loss, logits = case_logprobs(m32, ids)
        lp64, loss64, logits64 = case_logprobs(m64, ids)
        assert torch.isfinite(lp).all() and torch.isfinite(loss)
        manual = -lp.double().mean().item()
        assert abs(manual - loss.item()) < 1e-5, (manual, loss.item())
        spread_lp = max(spread_lp, (lp.double() - lp64).abs().max().item())
        spread_logit = max(spread_logit, (logits.double() - logits64).abs().max().item())
        spread_loss = max(spread_loss, abs(loss.item() - loss64.item()))
        cases.append({"name": f"seq{n}", "input_ids": [ids], "logprobs": [[r9(v) for v in lp[0].tolist()]],
                      "loss": r9(loss.item()), "loss_float64": float(f"{loss64.item():.12g}")})
    ref = {
        "model_name": name, "hf_class": cls.__name__, "model_type": m32.config.model_type,
        "seed": spec["used_seed"], "attn_implementation": ATTN, "dtype": "float32", "versions": VERSIONS,
        "num_parameters": sum(p.numel() for p in m32.parameters()),
        "tie_word_embeddings": bool(m32.config.tie_word_embeddings),  # top level decides for the VL class
        "layer_types": layer_types_of(m32),
        "logprobs_definition": "logprobs[b][t] = log_softmax(logits[b][t])[input_ids[b][t+1]], t=0..T-2 (float32, 9 sig. digits)",
        "loss_definition": "transformers loss with labels=input_ids: mean over T-1 shifted tokens of cross-entropy",
        "forward": "model(input_ids=..., labels=input_ids, use_cache=False), no attention_mask, eval mode"
                   + (", text-only through Qwen3_5ForConditionalGeneration (no pixel_values)" if name == "qwen3_5_vl" else ""),
        "cases": cases,
        "f64_spread": {"max_abs_logprob_diff": spread_lp, "max_abs_logit_diff": spread_logit,
                       "max_abs_loss_diff": spread_loss,
                       "note": "float32 model vs the same weights loaded with dtype=float64, same cases"},
    }
    if tap.handles:
        ref["moe_router_margin"] = tap.margin()
        ref["moe_router_margin_note"] = ("min over all tokens of the reference cases and all MoE layers of "
                                         "p(2nd) - p(3rd) of the router softmax (float32)")
        p32 = torch.cat([torch.softmax(l.double(), -1) for l in tap.logits])
        p64 = torch.cat([torch.softmax(l.double(), -1) for l in tap64.logits])
        ref["moe_router_prob_f64_spread"] = (p32 - p64).abs().max().item()
        ref["moe_router_tokens"] = p32.shape[0]
        ref["moe_topk_sets_equal_f32_f64"] = bool(torch.equal(p32.topk(2, -1).indices.sort(-1).values,
                                                              p64.topk(2, -1).indices.sort(-1).values))
    tap.remove(); tap64.remove()
    with open(os.path.join(model_dir, "logprobs_input.jsonl"), "w") as f:
        for c in cases:
            f.write(json.dumps({"ids": c["input_ids"][0]}) + "\n")
    return ref, m32


def router_margin_quick(model):
    """margin over the reference-case tokens (same ids as make_reference would draw)."""
    rng = random.Random(model._case_seed)
    tap = RouterTap(model)
    for n in CASE_LENGTHS:
        ids = [rng.randrange(3, 256) for _ in range(n)]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    m = tap.margin()
    tap.remove()
    return m


# ---------------------------------------------------------------------------------------------
# Saving / post-processing
def save_model(name, model, model_dir):
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir, safe_serialization=True)
    notes = {}
    if name == "qwen3_next_r3":
        path = os.path.join(model_dir, "config.json")
        cfg = json.load(open(path))
        notes["save_pretrained_wrote_layer_types"] = "layer_types" in cfg
        notes["save_pretrained_wrote_full_attention_interval"] = "full_attention_interval" in cfg
        cfg.pop("layer_types", None)
        cfg["full_attention_interval"] = 3
        cfg = dict(sorted(cfg.items()))
        with open(path, "w") as f:
            f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if name == "qwen3_5_vl":
        path = os.path.join(model_dir, "model.safetensors")
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        notes["keys_written_by_save_pretrained"] = len(tensors)
        for k in list(tensors):
            if k.startswith("model.visual."):
                tensors[k] = tensors[k].to(torch.bfloat16)
        gen = torch.Generator().manual_seed(424242)
        for k, shape in MTP_EXTRA.items():
            tensors[k] = (0.1 * torch.randn(shape, generator=gen)).contiguous()
        save_file(tensors, path, metadata=meta)
    for fn in os.listdir(model_dir):
        os.chmod(os.path.join(model_dir, fn), 0o644)
    return notes


def check_roundtrip(name, spec, model, model_dir):
    """reload from disk; same layer_types, same parameters, same logits as the in-memory model."""
    info = {}
    cls = spec["cls"]
    reloaded, loading = load(model_dir, cls, output_loading_info=True)
    info["loading_info"] = {k: sorted(v) if isinstance(v, (set, list)) else str(v) for k, v in loading.items()
                            if k != "error_msgs" or v}
    assert layer_types_of(reloaded) == spec["expect_layer_types"], layer_types_of(reloaded)
    sd0, sd1 = model.state_dict(), reloaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    x = torch.tensor([[5, 17, 99, 3, 250, 200, 31, 8, 77]])
    model.eval(); reloaded.eval()
    with torch.no_grad():
        a = model(input_ids=x, use_cache=False).logits
        b = reloaded(input_ids=x, use_cache=False).logits
    info["reload_max_abs_logit_diff"] = (a - b).abs().max().item()
    assert info["reload_max_abs_logit_diff"] == 0.0
    if name == "qwen3_next_r3":
        # config parsed from the edited config.json equals the in-memory one
        c0, c1 = model.config.to_dict(), reloaded.config.to_dict()
        diff = {k: (c0.get(k), c1.get(k)) for k in set(c0) | set(c1)
                if c0.get(k) != c1.get(k) and k not in ("transformers_version", "_name_or_path")}
        info["config_diff_after_reload"] = {k: str(v) for k, v in diff.items()}
        assert not diff, diff
        info["mlp_kind_per_layer"] = [type(l.mlp).__name__ for l in reloaded.model.layers]
        info["experts_implementation"] = reloaded.config._experts_implementation
        grouped = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTN).eval()
        info["default_experts_implementation"] = grouped.config._experts_implementation
        with torch.no_grad():
            g = grouped(input_ids=x, use_cache=False).logits
        info["default_vs_eager_experts_max_abs_logit_diff"] = (a - g).abs().max().item()
    if name == "qwen3_5_vl":
        with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
            dtypes = {}
            for k in f.keys():
                dtypes.setdefault(str(f.get_slice(k).get_dtype()), []).append(k)
        info["file_dtypes"] = {k: len(v) for k, v in dtypes.items()}
        info["visual_params_loaded_dtype"] = str(reloaded.model.visual.patch_embed.proj.weight.dtype)
        info["lm_head_is_embed_tokens"] = (reloaded.lm_head.weight.data_ptr()
                                           == reloaded.model.language_model.embed_tokens.weight.data_ptr())
        # the same language model read by the text-only class (transformers' qwen3_5_text PrefixChange)
        try:
            text = Qwen3_5ForCausalLM.from_pretrained(model_dir, config=reloaded.config.text_config,
                                                      dtype=torch.float32, attn_implementation=ATTN)
            with torch.no_grad():
                c = text(input_ids=x, use_cache=False).logits
            info["as_Qwen3_5ForCausalLM_max_abs_logit_diff"] = (a - c).abs().max().item()
        except Exception as e:  # informational only
            info["as_Qwen3_5ForCausalLM_error"] = repr(e)[:300]
    return info


def vl_tie_rule():
    """Which tie_word_embeddings flag Qwen3_5ForConditionalGeneration obeys (top level vs text_config)."""
    out = []
    for top, text in [(False, True), (True, False)]:
        cfg = qwen3_5_vl_config()
        cfg.tie_word_embeddings = top
        cfg.text_config.tie_word_embeddings = text
        m = Qwen3_5ForConditionalGeneration(cfg)
        tied = m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()
        out.append({"top_level": top, "text_config": text, "lm_head_tied": tied})
    return out


def tensor_names(model_dir):
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return {k: [str(f.get_slice(k).get_dtype()), f.get_slice(k).get_shape()] for k in sorted(f.keys())}


# ---------------------------------------------------------------------------------------------
# Training (same procedure as scripts/gen-train-reference.py)
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


def completion_logps(model, prompts, completions, check=None):
    seqs = [p + c for p, c in zip(prompts, completions)]
    input_ids, mask = padded(seqs)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    if check is not None:  # padded batch vs each sequence alone, on the real positions
        with torch.no_grad():
            for b, s in enumerate(seqs):
                alone = model(input_ids=torch.tensor([s]), use_cache=False).logits[0, :-1]
                check.append((logits[b, :len(s) - 1].detach() - alone).abs().max().item())
    logits = logits if logits.dtype == torch.float64 else logits.float()  # the f64 reference stays f64
    logp = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    score = torch.zeros_like(logp)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        score[b, len(p) - 1: len(p) - 1 + len(c)] = 1.0
    return logp, score, mask


def save_trained(model, path):
    """model.save_pretrained -> model.safetensors: the on-disk (checkpoint) names, e.g. per-expert MoE
    tensors and no lm_head.weight for tied embeddings."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(os.path.join(tmp, "model.safetensors"), path)


def train_sft(model, sft, extra=None, margins=None, checks=None):
    """SFT steps over `sft` in batches of BATCH; returns the step losses. `extra`, `margins` and
    `checks` collect the float32 run's bookkeeping (padding, router margins, padded-vs-alone)."""
    tap = RouterTap(model)
    opt = optimizer(model)
    losses = []
    for i in range(0, len(sft), BATCH):
        chunk = sft[i:i + BATCH]
        logp, score, mask = completion_logps(model, [e["prompt"] for e in chunk], [e["completion"] for e in chunk],
                                             check=checks)
        if extra is not None:
            extra["padding_widths"]["sft"].append((mask == 0).sum(1).tolist())
        if tap.handles and margins is not None:
            margins.append(tap.margin(valid=mask.reshape(-1).bool()))  # first call = the padded batch
        tap.clear()
        loss = -(logp * score).sum() / score.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tap.remove()
    return losses


def train_dpo(model, reference, dpo, extra=None, margins=None):
    """DPO steps over `dpo` (sigmoid loss, summed completion log-probs, `reference` frozen)."""
    tap = RouterTap(model)
    opt = optimizer(model)
    losses = []
    for i in range(0, len(dpo), BATCH):
        chunk = dpo[i:i + BATCH]
        prompts = [e["prompt"] for e in chunk] * 2
        comps = [e["chosen"] for e in chunk] + [e["rejected"] for e in chunk]
        logp, score, mask = completion_logps(model, prompts, comps)
        if extra is not None:
            extra["padding_widths"]["dpo"].append((mask == 0).sum(1).tolist())
        if tap.handles and margins is not None:
            margins.append(tap.margin(valid=mask.reshape(-1).bool()))
        tap.clear()
        sums = (logp * score).sum(1)
        with torch.no_grad():
            rlogp, rscore, _ = completion_logps(reference, prompts, comps)
            rsums = (rlogp * rscore).sum(1)
        n = len(chunk)
        logits = (sums[:n] - sums[n:]) - (rsums[:n] - rsums[n:])
        loss = -F.logsigmoid(BETA * logits).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tap.remove()
    return losses


def train(name, spec, model_dir):
    out = os.path.join(model_dir, "train")
    os.makedirs(out, exist_ok=True)
    cls = spec["cls"]
    rng = random.Random(1234)

    def ids(n):
        return [rng.randrange(3, 256) for _ in range(n)]

    sft = [{"prompt": ids(rng.randrange(3, 9)), "completion": ids(rng.randrange(2, 7))} for _ in range(5)]
    dpo = [{"prompt": ids(rng.randrange(3, 9)), "chosen": ids(rng.randrange(2, 7)),
            "rejected": ids(rng.randrange(2, 7))} for _ in range(5)]
    with open(os.path.join(out, "sft.jsonl"), "w") as f:
        for e in sft:
            f.write(json.dumps({"input_ids": e["prompt"] + e["completion"],
                                "completion_mask": [0] * len(e["prompt"]) + [1] * len(e["completion"])}) + "\n")
    with open(os.path.join(out, "dpo.jsonl"), "w") as f:
        for e in dpo:
            f.write(json.dumps({"prompt_input_ids": e["prompt"], "chosen_input_ids": e["chosen"],
                                "rejected_input_ids": e["rejected"]}) + "\n")

    def fresh():
        m = load(model_dir, cls)
        m.train()
        return m

    losses = {"sft": [], "dpo": []}
    extra = {"padding_widths": {"sft": [], "dpo": []}, "padded_vs_unbatched_max_abs_logit_diff": 0.0}
    margins = []
    start = load_file(os.path.join(model_dir, "model.safetensors"))

    model = fresh()
    extra["param_groups"] = {"decay": [n for n, p in model.named_parameters() if p.ndim >= 2],
                             "no_decay": [n for n, p in model.named_parameters() if p.ndim < 2]}
    checks = []
    losses["sft"] = train_sft(model, sft, extra, margins, checks)
    extra["padded_vs_unbatched_max_abs_logit_diff"] = max(checks)
    save_trained(model, os.path.join(out, "sft_after.safetensors"))
    sft_model = model

    model = fresh()
    reference = load(model_dir, cls).eval()
    losses["dpo"] = train_dpo(model, reference, dpo, extra, margins)
    save_trained(model, os.path.join(out, "dpo_after.safetensors"))

    for kind in ("sft", "dpo"):
        after = load_file(os.path.join(out, f"{kind}_after.safetensors"))
        assert after.keys() == start.keys(), (set(after) ^ set(start))
        moved = {k: (after[k] - start[k]).abs().max().item() for k in start}
        assert all(torch.isfinite(v).all() for v in after.values())
        extra[f"{kind}_min_moved"] = min(moved.values())
        extra[f"{kind}_least_moved_tensor"] = min(moved, key=moved.get)
    if margins:
        extra["train_moe_router_margin"] = min(margins)
        extra["train_moe_router_margin_note"] = ("min over the policy's forwards (non-padded tokens, all MoE "
                                                 "layers, all steps) of p(2nd) - p(3rd)")
    # sanity: mean completion NLL over all 5 SFT examples (unpadded) before / after SFT training
    def sft_eval(m):
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for e in sft:
                lp, sc, _ = completion_logps(m, [e["prompt"]], [e["completion"]])
                tot += -(lp * sc).sum().item(); cnt += int(sc.sum().item())
        return tot / cnt
    extra["sft_eval_nll_before"] = sft_eval(load(model_dir, cls).eval())
    extra["sft_eval_nll_after"] = sft_eval(sft_model.eval())
    assert extra["sft_eval_nll_after"] < extra["sft_eval_nll_before"]
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump({"lr": LR, "weight_decay": WD, "beta": BETA, "batch_size": BATCH, "losses": losses,
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "attn_implementation": ATTN, **extra}, f, indent=1)
    return losses, extra


def read_train_data(out):
    """The examples of train/{sft,dpo}.jsonl back as prompt/completion id lists."""
    sft, dpo = [], []
    with open(os.path.join(out, "sft.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            cut = e["completion_mask"].index(1)
            sft.append({"prompt": e["input_ids"][:cut], "completion": e["input_ids"][cut:]})
    with open(os.path.join(out, "dpo.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            dpo.append({"prompt": e["prompt_input_ids"], "chosen": e["chosen_input_ids"],
                        "rejected": e["rejected_input_ids"]})
    return sft, dpo


def train_float64(name, spec, model_dir):
    """The same SFT and DPO steps in float64 from the same float32 start weights (upcast exactly),
    on the committed train/{sft,dpo}.jsonl. Writes train/{sft,dpo}_after_f64.safetensors (the float64
    result rounded to float32) and train/f64_reference.json: how far torch's own float32 trajectory
    ({sft,dpo}_after.safetensors) lands from it, per tensor. The Rust trainer tests derive their
    tolerance from that spread (see the README)."""
    out = os.path.join(model_dir, "train")
    cls = spec["cls"]
    sft, dpo = read_train_data(out)
    start = load_file(os.path.join(model_dir, "model.safetensors"))
    ref = {"note": ("float64 training (same data, optimizer, lr, steps) from the float32 start weights; "
                    "{sft,dpo}_after_f64.safetensors hold its result rounded to float32"),
           "versions": VERSIONS, "losses_float64": {}, "rounding_to_float32_max_abs": 0.0,
           "torch_float32_vs_float64": {}}
    for kind in ("sft", "dpo"):
        model = load(model_dir, cls, dtype=torch.float64)
        model.train()
        if kind == "sft":
            losses = train_sft(model, sft)
        else:
            reference = load(model_dir, cls, dtype=torch.float64).eval()
            losses = train_dpo(model, reference, dpo)
        ref["losses_float64"][kind] = losses
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            exact = load_file(os.path.join(tmp, "model.safetensors"))
        assert exact.keys() == start.keys(), set(exact) ^ set(start)
        assert all(t.dtype == torch.float64 for t in exact.values())
        rounded = {k: v.float().contiguous() for k, v in sorted(exact.items())}
        ref["rounding_to_float32_max_abs"] = max(
            ref["rounding_to_float32_max_abs"],
            max((exact[k] - rounded[k].double()).abs().max().item() for k in exact))
        save_file(rounded, os.path.join(out, f"{kind}_after_f64.safetensors"), metadata={"format": "pt"})
        # measured against the rounded values, as the Rust test does (both sides pay the rounding)
        torch32 = load_file(os.path.join(out, f"{kind}_after.safetensors"))
        per = {k: (torch32[k].double() - rounded[k].double()).abs().flatten() for k in sorted(exact)}
        every = torch.cat(list(per.values())).sort().values
        ref["torch_float32_vs_float64"][kind] = {
            "worst": every[-1].item(), "p99.9": every[(every.numel() - 1) * 999 // 1000].item(),
            "elements": every.numel(), "max_abs_per_tensor": {k: d.max().item() for k, d in per.items()}}
    with open(os.path.join(out, "f64_reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    return ref


# ---------------------------------------------------------------------------------------------
def main():
    if sys.argv[1:] == ["--f64-only"]:
        # only the float64 trajectories, from the committed models and data (nothing else rewritten)
        for name, spec in MODELS.items():
            if spec["train"]:
                ref = train_float64(name, spec, os.path.join(OUT, name))
                print(name, json.dumps(ref["losses_float64"]))
        return
    assert not sys.argv[1:], "usage: gen-hybrid-reference.py [--f64-only]"
    os.makedirs(OUT, exist_ok=True)
    summary = {}
    for name, spec in MODELS.items():
        CALLS.clear()
        model_dir = os.path.join(OUT, name)
        seed = spec["seed"]
        tried = []
        while True:
            model, perturbed = build(name, spec, seed)
            if not isinstance(model, Qwen3NextForCausalLM):
                break
            model.eval()
            model._case_seed = seed
            m = router_margin_quick(model)
            tried.append((seed, m))
            if m >= 1e-4:
                break
            seed += 1
        spec["used_seed"] = seed
        notes = save_model(name, model, model_dir)
        info = check_roundtrip(name, spec, model, model_dir)
        ref, m32 = make_reference(name, spec, model_dir, random.Random(seed))
        ref["init_note"] = (f"from_config under torch.manual_seed({seed}) with initializer_range=0.1, then every "
                            "parameter whose name contains 'norm', ends with '.bias', 'dt_bias' or 'A_log' got "
                            f"+= 0.1*N(0,1) (torch.Generator seed {seed + 100000}). model.safetensors is the "
                            "source of truth.")
        ref["perturbed_parameters"] = perturbed
        if tried:
            ref["seeds_tried_for_router_margin"] = tried
        ref["save_notes"] = notes
        ref["roundtrip"] = info
        ref["tensors"] = tensor_names(model_dir)
        ref["gdn_kernel_paths"] = {"resolved": KERNEL_INFO,
                                   "calls_during_generation": dict(sorted(CALLS.items()))}
        if name == "qwen3_5_vl":
            ref["extra_mtp_tensors"] = {k: list(v) for k, v in MTP_EXTRA.items()}
            ref["tie_rule_observed"] = vl_tie_rule()
            ref["vl_note"] = ("model.visual.* tensors are stored as bfloat16 (values were rounded to bf16 before "
                              "saving); mtp.* tensors (float32, random) were appended after save_pretrained and "
                              "are ignored by transformers on load (_keys_to_ignore_on_load_unexpected ^mtp.*).")
        with open(os.path.join(model_dir, "reference.json"), "w") as f:
            json.dump(ref, f, indent=1)
            f.write("\n")
        summary[name] = {"layer_types": ref["layer_types"], "f64_spread": ref["f64_spread"],
                         "moe_router_margin": ref.get("moe_router_margin"), "seed": seed}
        if spec["train"]:
            CALLS.clear()
            losses, extra = train(name, spec, model_dir)
            train_float64(name, spec, model_dir)
            summary[name]["losses"] = losses
            summary[name]["padded_vs_unbatched"] = extra["padded_vs_unbatched_max_abs_logit_diff"]
            summary[name]["train_moe_router_margin"] = extra.get("train_moe_router_margin")
            summary[name]["train_kernel_calls"] = dict(sorted(CALLS.items()))
            summary[name]["min_moved"] = (extra["sft_min_moved"], extra["sft_least_moved_tensor"],
                                          extra["dpo_min_moved"], extra["dpo_least_moved_tensor"])
    summary["fallback_warnings"] = [m for m in CAPTURE.messages if "fall" in m.lower()]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
