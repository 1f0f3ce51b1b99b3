"""LoFT on the authors' toy factorisation, and what its state costs on a real peft model.

Toy (LOFT.md, after the authors' experiment): fit a target T = U V (U m x r, V r x n, N(0, 1) entries)
with an adapter W = B A (identity input, W0 = 0, s = alpha/r = 1), MSE loss mean((W - T)^2), 300 steps,
betas (0.9, 0.999), eps 1e-4, weight decay 0, both factors at nn.Linear's default init (so W0 = B0 A0
is small, not zero); --hetero scales the target's rows and columns by 0.1 to 10, where per-coordinate
second moments (and so the r x r matrices against one value per row/column) should matter. Arms:

  loft          snsm.LoFTAdamW (the paper's r x r second moments; alternating B/A steps)
  loft-subset   snsm.LoFTAdamW(second_moment="subset"): one value per row/column of the full update
  loft-joint    snsm.LoFTAdamW(joint=True): both factors every step (the no-alternation ablation)
  lora-adamw    torch.optim.AdamW on A and B (plain LoRA)
  full-adamw    torch.optim.AdamW on W itself, started at B0 A0

For each arm and learning rate: the final loss (mean +- std over seeds), the steps it took to get the loss
below 1e-6, and the optimizer step's time.
LOFT.md gives lr 10 for the toy; the sweep shows where each arm is best.

Memory (--memory): a tiny random Llama (transformers, no download) with peft LoRA on every linear
projection; the bytes of optimizer state after one step for AdamW on the LoRA factors and for LoFT
(full and subset), beside the formula of snsm.loft.state_floats.

Usage: python benchmarks/loft_toy.py [--m 1024 --n 512 --r 8 --steps 300 --seeds 3 --lrs 10,3,1,0.3,0.1,0.03]
       python benchmarks/loft_toy.py --hetero
       python benchmarks/loft_toy.py --memory
"""
import argparse
import math
import statistics
import time
import warnings

import torch
from torch import nn

from snsm import LoFTAdamW
from snsm.loft import state_floats

ARMS = ("loft", "loft-subset", "loft-joint", "lora-adamw", "full-adamw")
THRESHOLD = 1e-6  # "solved": the steps to get the loss below this are the second number of a cell


def run(arm, seed, m, n, r, steps, lr, eps=1e-4, hetero=False):
    """Final loss, the first step with a loss below THRESHOLD (None: never) and the mean optimizer-step
    time (s) of one arm on one seed."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    if hetero:  # rows and columns on scales from 0.1 to 10: where per-coordinate second moments matter
        rows = torch.logspace(-1, 1, m)[torch.randperm(m, generator=gen)]
        cols = torch.logspace(-1, 1, n)[torch.randperm(n, generator=gen)]
        target = rows[:, None] * target * cols[None, :]
    torch.manual_seed(seed + 1000)
    a = nn.Parameter(nn.Linear(n, r, bias=False).weight.detach().clone())  # r x n, default init
    b = nn.Parameter(nn.Linear(r, m, bias=False).weight.detach().clone())  # m x r, default init
    if arm == "full-adamw":
        w = nn.Parameter((b @ a).detach().clone())
        opt = torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
        product = lambda: w  # noqa: E731
    else:
        product = lambda: b @ a  # noqa: E731
        if arm == "lora-adamw":
            opt = torch.optim.AdamW([a, b], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
        else:
            options = {"loft": {}, "loft-subset": {"second_moment": "subset"}, "loft-joint": {"joint": True}}[arm]
            opt = LoFTAdamW([("toy.lora_A.default.weight", a), ("toy.lora_B.default.weight", b)], lr=lr,
                            betas=(0.9, 0.999), eps=eps, weight_decay=0.0, scaling=1.0, **options)
    step_time = 0.0
    reached = None
    for step in range(steps):
        opt.zero_grad()
        loss = (product() - target).square().mean()
        if reached is None and loss.item() < THRESHOLD:
            reached = step
        loss.backward()
        start = time.perf_counter()
        opt.step()
        step_time += time.perf_counter() - start
    with torch.no_grad():
        final = (product() - target).square().mean().item()
    if reached is None and final < THRESHOLD:
        reached = steps
    return final, reached, step_time / steps


def toy(args):
    lrs = [float(x) for x in args.lrs.split(",")]
    arms = args.arms.split(",")
    print(f"Toy factorisation{' (rows and columns scaled 0.1-10)' if args.hetero else ''}: m={args.m} n={args.n} "
          f"r={args.r}, {args.steps} steps, {args.seeds} seeds, betas (0.9, 0.999), eps 1e-4, wd 0. Cells: final "
          f"loss mean((W - T)^2), mean +- std over seeds (mean steps to a loss below {THRESHOLD:g}); best: the "
          "fewest steps, then the lowest loss; step ms: the optimizer step's median time")
    header = "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best | step ms |"
    print(header)
    print("|" + "---|" * (len(lrs) + 3))
    for arm in arms:
        cells, best, times = [], None, []
        for lr in lrs:
            results = [run(arm, seed, args.m, args.n, args.r, args.steps, lr, hetero=args.hetero)
                       for seed in range(args.seeds)]
            finals = [f for f, _, _ in results]
            reached = [s for _, s, _ in results]
            times += [t for _, _, t in results]
            mean = statistics.mean(finals)
            std = statistics.stdev(finals) if len(finals) > 1 else 0.0
            solved = f"{statistics.mean(reached):.0f}" if None not in reached else f">{args.steps}"
            cells.append(f"{mean:.2g} +- {std:.1g} ({solved})")
            key = (statistics.mean(reached) if None not in reached else math.inf, mean)
            if mean == mean and (best is None or key < best[0]):
                best = (key, lr, cells[-1])
        best_cell = f"lr {best[1]:g}: {best[2]}" if best else "nan"
        print(f"| {arm} | " + " | ".join(cells) + f" | {best_cell} | {1000 * statistics.median(times):.2f} |",
              flush=True)


def memory(args):
    warnings.filterwarnings("ignore", category=FutureWarning)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    r = args.r
    tokens = torch.randint(0, 1000, (2, 32))
    print(f"State bytes after one step: tiny Llama (hidden 256, intermediate 688, 2 layers, float32), peft LoRA "
          f"r = alpha = {r} on {', '.join(targets)}")
    print("| optimizer | state bytes | / AdamW on LoRA | formula bytes |")
    print("|---|---|---|---|")
    base_bytes = None
    for name in ("adamw", "loft", "loft-subset"):
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, lora_alpha=r, target_modules=targets))
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if name == "adamw":
            opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3)
        else:
            opt = LoFTAdamW(model, lr=1e-3, second_moment="subset" if name == "loft-subset" else "full")
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        measured = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                       if torch.is_tensor(v) and k != "step")
        formula = 0
        for n, p in trainable:
            if ".lora_A." in n:
                b = dict(trainable)[n.replace(".lora_A.", ".lora_B.")]
                m_, n_, r_ = b.shape[0], p.shape[1], p.shape[0]
                floats = 2 * r_ * (m_ + n_) if name == "adamw" else state_floats(
                    m_, n_, r_, "subset" if name == "loft-subset" else "full")
                formula += 4 * floats
        base_bytes = base_bytes or measured
        print(f"| {name} | {measured:,} | {measured / base_bytes:.2f}x | {formula:,} |")
    print()
    print("Formula for one 4096 x 4096 projection (floats): "
          + ", ".join(f"r={rr}: AdamW {2 * rr * 8192:,}, LoFT {state_floats(4096, 4096, rr):,}, "
                      f"LoFT-subset {state_floats(4096, 4096, rr, 'subset'):,}" for rr in (8, 16, 64)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="10,3,1,0.3,0.1,0.03")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--hetero", action="store_true",
                        help="scale the target's rows and columns by 0.1 to 10 (log-spaced, shuffled)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="the state-size table on a tiny peft Llama instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        memory(args)
    else:
        toy(args)


if __name__ == "__main__":
    main()
