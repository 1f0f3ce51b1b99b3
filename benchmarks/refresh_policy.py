"""How should AdamWSNSM refresh its projector by default? Side-by-side evidence.

Trains the same models from the same initial weights on the same data with
each variant, over several seeds and projector gaps, and prints final training
loss (mean and std over seeds) and each variant's ratio to the first one.

* ``--compare policy`` (default): what happens to the momentum at a refresh,
  refresh="reset", "transport" and "reference";
* ``--compare schedule``: when and how the basis is recomputed, the paper's
  synchronized ``svd`` refresh (every matrix on the same step,
  ``stagger=False``) against the staggered ``svd`` default and the
  ``randomized`` and ``srht`` bases (staggered).

Two tasks:

* teacher-student: a 3-layer MLP student fits a fixed random teacher
  (regression), batch noise from fresh inputs every step;
* char-LM: a small 2-layer transformer predicts the next token of a synthetic
  first-order Markov text (cross-entropy).

Usage: python benchmarks/refresh_policy.py [--compare policy|schedule] [--steps 300] [--seeds 3]
"""
import argparse
import statistics

import torch
from torch import nn

import snsm
import tasks


VARIANTS = {
    "policy": {"reset": {"refresh": "reset"}, "transport": {"refresh": "transport"},
               "reference": {"refresh": "reference"}},
    "schedule": {"svd synchronized": {"stagger": False}, "svd staggered": {}, "randomized": {"proj": "randomized"},
                 "srht": {"proj": "srht"}},
}


def teacher_student(seed, steps, options, gap, rank):
    def make(student):
        return snsm.AdamWSNSM(snsm.param_groups(student, rank=rank, proj_gap=gap, **options), lr=1e-2,
                              weight_decay=0)

    losses, _ = tasks.teacher_student(make, seed, steps, warmup=30, clip=1.0)
    return statistics.mean(losses[-20:])


def markov_text(n, gen, vocab=48):
    """A first-order Markov chain with peaked transitions (entropy well below log(vocab))."""
    table = torch.rand(vocab, vocab, generator=gen).pow(8)
    table /= table.sum(-1, keepdim=True)
    seq = torch.empty(n, dtype=torch.long)
    seq[0] = 0
    u = torch.rand(n, generator=gen)
    cdf = table.cumsum(-1)
    for i in range(1, n):
        seq[i] = min(int(torch.searchsorted(cdf[seq[i - 1]], u[i])), vocab - 1)
    return seq, vocab


def char_lm(seed, steps, options, gap, rank):
    data, vocab = markov_text(60_000, torch.Generator().manual_seed(7))
    torch.manual_seed(seed)
    d = 128
    emb = nn.Embedding(vocab, d)
    layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True, norm_first=True)
    body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    head = nn.Linear(d, vocab)
    model = nn.ModuleDict(dict(emb=emb, body=body, head=head))
    opt = snsm.AdamWSNSM(snsm.param_groups(model, rank=rank, proj_gap=gap, **options), lr=1e-2, weight_decay=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 30))
    gen = torch.Generator().manual_seed(seed + 5)
    mask = nn.Transformer.generate_square_subsequent_mask(64)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data) - 65, (16,), generator=gen)
        x = torch.stack([data[i:i + 64] for i in idx])
        y = torch.stack([data[i + 1:i + 65] for i in idx])
        logits = head(body(emb(x), mask=mask, is_causal=True))
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return statistics.mean(losses[-20:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--gaps", default="10,50")
    ap.add_argument("--compare", choices=sorted(VARIANTS), default="policy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    variants = VARIANTS[args.compare]
    first, *others = variants
    print(f"| task | gap | {' | '.join(variants)} | {' | '.join(f'{v}/{first}' for v in others)} |")
    print("|---|---|" + "---|" * (2 * len(variants) - 1))
    for task, fn, rank in (("teacher-student", teacher_student, 16), ("char-LM", char_lm, 16)):
        for gap in map(int, args.gaps.split(",")):
            res = {v: [fn(s, args.steps, o, gap, rank) for s in range(args.seeds)] for v, o in variants.items()}
            cells = [f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}" for v in res.values()]
            base = statistics.mean(res[first])
            ratios = [f"{statistics.mean(res[v]) / base:.3f}" for v in others]
            print(f"| {task} | {gap} | {' | '.join(cells)} | {' | '.join(ratios)} |", flush=True)


if __name__ == "__main__":
    main()
