"""bfloat16 optimizer state: how far does the trajectory drift from float32 state?

Trains the same student MLP (fits a fixed random teacher, fresh inputs every
step) from the same weights on the same batches with float32 state, bfloat16
state rounded to nearest, and bfloat16 state with stochastic rounding (the
default for bf16 state), per optimizer and seed, and prints

* final training loss (mean of the last 20 steps), mean over seeds;
* drift: ``||W - W_fp32|| / ||W_fp32 - W_0||``, the distance to the float32
  run relative to how far that run moved (0: identical trajectory).

Usage: python benchmarks/bf16_state.py [--steps 400] [--seeds 3]
"""
import argparse
import statistics

import torch

import snsm
import tasks

OPTIMIZERS = {
    "AdamWSN": lambda m, **kw: snsm.AdamWSN(snsm.param_groups(m), lr=3e-3, weight_decay=0, **kw),
    "AdamWSNSM": lambda m, **kw: snsm.AdamWSNSM(snsm.param_groups(m, rank=16, proj_gap=50), lr=3e-3,
                                                weight_decay=0, **kw),
    "AdaGradSN": lambda m, **kw: snsm.AdaGradSN(snsm.param_groups(m), lr=3e-2, weight_decay=0, **kw),
}
STATES = {
    "float32": dict(state_dtype="float32"),
    "bf16 nearest": dict(state_dtype="bfloat16", stochastic_rounding=False),
    "bf16 stochastic": dict(state_dtype="bfloat16", stochastic_rounding=True),
}


def run(name, state, seed, steps):
    starts = []

    def make(student):
        starts.extend(p.detach().clone() for p in student.parameters())
        return OPTIMIZERS[name](student, **STATES[state])

    losses, student = tasks.teacher_student(make, seed, steps)
    return statistics.mean(losses[-20:]), starts, [p.detach().clone() for p in student.parameters()]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"teacher-student MLP, {args.steps} steps, {args.seeds} seeds")
    print("| optimizer | state | final loss | drift from float32 |")
    print("|---|---|---|---|")
    for name in OPTIMIZERS:
        results = {state: [run(name, state, s, args.steps) for s in range(args.seeds)] for state in STATES}
        for state, runs in results.items():
            drifts = []
            for (_, w0, w), (_, _, w32) in zip(runs, results["float32"]):
                drifts.append((flat(w) - flat(w32)).norm().item() / (flat(w32) - flat(w0)).norm().item())
            loss = statistics.mean(r[0] for r in runs)
            print(f"| {name} | {state} | {loss:.4f} | {statistics.mean(drifts):.3f} |")


if __name__ == "__main__":
    main()
