"""LoRA factors under AdamW-SN: one accumulator per row of the tall frame ("auto") or per coordinate?

Evidence for the default of ``snsm.param_groups(..., lora_subset_size=...)`` (docs/finetuning.md).

Setting: a byte-level LlamaForCausalLM (vocab 256, hidden 128, 2 layers, 4 heads, MLP 352, sequences of
128 bytes) is first trained from scratch on the embedded corpus's Austen, Bible and Milton texts (AdamW,
``--base-steps`` steps, seed 0, the same base for every run), then fine-tuned with PEFT LoRA (r 8,
alpha 16, on q/k/v/o and gate/up/down projections; base weights frozen) on Shakespeare, for ``--steps``
steps (batch 16, 20 warmup steps then cosine to 0, no weight decay, no clipping). The held-out part of
Shakespeare (a hash split by document) gives the validation loss: mean over 32 fixed batches at the end.

Compared, each at the best of its ``--lrs`` (chosen on seed 0's validation loss, then ``--seeds`` seeds):

* ``sn-auto``   snsm.AdamWSN, LoRA factors with subset_size "auto" (state: d_in + d_out values per adapter)
* ``sn-coord``  snsm.AdamWSN, LoRA factors coordinate-wise (lora_subset_size=None: AdamW's arithmetic)
* ``adamw``     torch.optim.AdamW on the LoRA factors (the usual recipe)

Usage: python benchmarks/lora_subsets.py [--steps 300] [--seeds 3] [--base-steps 600] [--only sn-auto,adamw]
"""
import argparse
import hashlib
import json
import lzma
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

import snsm

CORPUS = Path(__file__).resolve().parents[1] / "src" / "snsm" / "bench" / "data" / "corpus.jsonl.xz"
SEQ, BATCH, VAL_BATCHES, WARMUP = 128, 16, 32, 20
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LRS = {"sn-auto": (1e-2, 3e-2, 1e-1), "sn-coord": (1e-3, 3e-3, 1e-2, 3e-2),
       "adamw": (1e-3, 3e-3, 1e-2, 3e-2)}


def texts():
    rows = [json.loads(line) for line in lzma.open(CORPUS, "rt")]
    base = [r["text"] for r in rows if r["source"] in ("austen", "bible", "milton")]
    shake = [r for r in rows if r["source"] == "shakespeare"]
    held = [hashlib.sha256(r["title"].encode()).digest()[0] < 40 for r in shake]
    tune = [r["text"] for r, h in zip(shake, held) if not h]
    val = [r["text"] for r, h in zip(shake, held) if h]
    return base, tune, val


def tokens(docs):
    return torch.tensor(list("\n\n".join(docs).encode("utf-8", "replace")), dtype=torch.long).clamp_(max=255)


def batch(data, gen):
    starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
    return torch.stack([data[s:s + SEQ] for s in starts.tolist()])


def schedule(step, steps):
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))


def train(model, opt, data, steps, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    for _ in range(steps):
        x = batch(data, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, data):
    gen = torch.Generator().manual_seed(7)
    model.eval()
    losses = [model(input_ids=(x := batch(data, gen)), labels=x).loss.item() for _ in range(VAL_BATCHES)]
    model.train()
    return statistics.mean(losses)


def base_model(base_text, steps, cache):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    path = Path(cache) / f"lora_base_{steps}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    train(model, opt, base_text, steps, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def optimizer(method, model, lr):
    if method == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    lora_subset_size = "same" if method == "sn-auto" else None
    return snsm.AdamWSN(snsm.param_groups(model, lora_subset_size=lora_subset_size), lr=lr, weight_decay=0.0)


def state_elements(opt):
    return sum(v.numel() for s in opt.state.values() for k, v in s.items()
               if torch.is_tensor(v) and k == "exp_avg_sq")


def finetune(method, lr, seed, base_state, tune, val, steps):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.load_state_dict(base_state)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    opt = optimizer(method, model, lr)
    train(model, opt, tune, steps, seed)
    return evaluate(model, val), state_elements(opt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--only", default=None, help="comma-separated methods (default: all)")
    ap.add_argument("--cache", default="/tmp/snsm_lora_subsets", help="where the base model is kept")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    base, tune, val = texts()
    base_text, tune_text, val_text = tokens(base), tokens(tune), tokens(val)
    t0 = time.time()
    model = base_model(base_text, args.base_steps, args.cache)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"base model: {args.base_steps} steps, Shakespeare val loss before LoRA {evaluate(model, val_text):.4f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    methods = args.only.split(",") if args.only else list(LRS)
    rows = []
    for method in methods:
        sweep = {}
        for lr in LRS[method]:
            sweep[lr], _ = finetune(method, lr, 0, base_state, tune_text, val_text, args.steps)
            print(f"  {method} lr {lr:g} seed 0: val {sweep[lr]:.4f}", flush=True)
        best = min(sweep, key=sweep.get)
        results, elements = [sweep[best]], None
        for seed in range(1, args.seeds):
            loss, elements = finetune(method, best, seed, base_state, tune_text, val_text, args.steps)
            results.append(loss)
            print(f"  {method} lr {best:g} seed {seed}: val {loss:.4f}", flush=True)
        if elements is None:
            _, elements = finetune(method, best, 0, base_state, tune_text, val_text, 1)
        std = statistics.stdev(results) if len(results) > 1 else 0.0
        rows.append((method, best, statistics.mean(results), std, elements))
    print(f"\n| method | lr | val loss (mean +- std, {args.seeds} seeds) | second-moment elements |")
    print("|---|---|---|---|")
    for method, lr, mean, std, elements in rows:
        print(f"| {method} | {lr:g} | {mean:.4f} +- {std:.4f} | {elements} |")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
