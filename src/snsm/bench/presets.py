"""Benchmark presets: model size, sequence length, batch, token budget, evaluation.

Why the CPU presets are the sizes they are (measured on the 2-core, no-GPU
development machine, one single-threaded worker process per core, CPU time):

* ``llama_9m`` dimensions (hidden 128, MLP 352, 4 layers, 4 heads) with the
  8192-token BPE have 2.90M parameters, 1.85M of them in ``nn.Linear``
  weights (where Subset-Norm / Subspace-Momentum act) and 1.05M in the
  embedding. A training step at sequence 256, batch 8 (2048 tokens) costs
  0.52-0.57 s for every optimizer compared (AdamW 0.53 s); an evaluation
  forward pass over 8 sequences 0.36 s. ``llama_20m`` costs about 2 s per
  step, which would leave each optimizer too few steps in the time budget.
* Curves separate early: in the learning-rate sweep (``configs/lr.json``),
  150 steps already put AdamW at 9e-4 / 3e-3 / 9e-3 up to 0.36 apart and
  AdamW, AdamW-SN and AdamW-SNSM (each at its best lr) 0.36 apart.
* The default preset runs ten optimizers, two at a time, five rounds. With
  about 20 minutes of wall clock each job gets about 3.5 minutes: 300 steps
  (0.61M training tokens, about 165 s), 11 evaluations of 64 validation
  sequences (16k tokens, about 30 s) and the worker's start-up (about 8 s).
  Training the tokenizer and tokenizing the corpus take about 13 s on first
  use and are cached. See ``DEFAULT_TIMING`` for the measured run.
* ``family`` (issue 7) is the default preset's model, data, length and
  learning-rate table with the AdaGrad family instead of the ten optimizers
  above: AdamW (the reference line), AdamW-SNSM (the default preset's best of
  ours, for context), ``adagrad-norm``, ``adagrad-sn``, ``adago``, ``muon``,
  ``adago-sm`` (AdaGO with subspace momentum), ``metastorm`` / ``metastorm-sn``
  (META-STORM, two gradient evaluations per step) and the adaptive-batch
  ``adagrad-norm+adaptive`` / ``adagrad-sn+adaptive`` (batch 8 -> at most 32
  sequences, micro-batch 2, the same 0.61M tokens). Eleven jobs, two at a
  time, six rounds: about 25 minutes on 2 cores (Newton-Schulz adds about
  0.065 s to a 0.53 s step for ``muon``, ``adago`` and ``adago-sm``; the
  adaptive entries run micro-batches of 2 sequences; ``--steps`` counts
  optimizer steps, so the META-STORM jobs evaluate 600 gradients where the
  others evaluate 300: for equal gradient evaluations run them apart with
  ``--steps 150 --eval-every 15``). They are not in ``default``, which would
  then take about 45 minutes: ``default`` keeps its ten optimizers and its
  ~20-minute budget.
* ``refresh`` (issue 5) is the default preset with AdamW, AdamW-SNSM as it
  ships (``svd`` basis, staggered refreshes) and three variants of its
  projector refresh: the paper's synchronized schedule (``stagger=False``),
  and the ``randomized`` and ``srht`` bases. Five jobs, two at a time, three
  rounds: 14 minutes a seed on 2 cores (measured; ``docs/bench/refresh_results.md``).
* ``smoke`` (used by the acceptance check) trains a 2048-token tokenizer on a
  2 MB sample of the corpus and runs AdamW, AdamW-SN and AdamW-SNSM for 60
  steps of sequence 128: it checks the plumbing, not the science, in about
  a minute. The tests shrink it further with command-line overrides.

The ``paper-*`` presets mirror the paper's LLaMA runs on C4 (sequence 256,
512 sequences per step, 10k / 20k / 60k / 100k steps for 60M / 130M / 350M /
1B, i.e. 1.3B-13.1B tokens, 32000-token vocabulary) and are meant for a GPU;
they stream ``allenai/c4`` (``en``) and so need the network, or take
``--data-files``. Their learning rates are the authors' (``configs/lr.json``,
table ``paper``).

Subspace-Momentum rank is ``hidden // 4`` for every size (128 for 60M as in
the authors' runs and GaLore's, 512 for 1B; 32 for ``llama_9m``), which keeps
it below min(m, n) of every projected matrix. The projector refresh gap is
scaled to the run: the authors refresh every 200 of 10k steps; the CPU presets
refresh every ``steps // 10`` steps (30 in the default preset, 6 in smoke),
about ten refreshes per run, since a run of a few hundred steps with gap 200
would hardly ever refresh.
"""
from __future__ import annotations

import dataclasses

from . import BenchError

OURS = ("adamw-sn", "adamw-snsm", "adamw-snsm-emb", "rmsprop-sn", "adagrad-snsm", "sgd-sm")
BASELINES = ("adamw", "adafactor", "galore", "adam-mini")
ALL_OPTIMIZERS = BASELINES + OURS
FAMILY = ("adagrad-norm", "adagrad-sn", "adago", "muon")  # issue 7: AdaGrad-Norm, AdaGO and the Muon peer
FAMILY_MORE = ("adago-sm", "metastorm", "metastorm-sn")  # subspace-momentum AdaGO; META-STORM (closure steps)
ADAPTIVE = ("adagrad-norm+adaptive", "adagrad-sn+adaptive")  # the same with the adaptive batch size
REFRESH = ("adamw-snsm-sync", "adamw-snsm-randomized", "adamw-snsm-srht")  # issue 5: refresh schedule, projector
#: the fine-tuning benchmark's methods (``--task finetune``, :mod:`snsm.bench.finetune`): full fine-tuning, then
#: adapters of equal rank (peft); not entries of the optimizer registry
FINETUNE = ("adamw", "adamw-sn", "adamw-snsm", "galore", "lora-adamw", "lora-adamw-sn", "dora-adamw", "loft")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark configuration. ``batch_size`` is sequences per optimizer step."""

    name: str
    model: str
    seq_len: int
    batch_size: int
    steps: int
    eval_every: int  # steps between validation evaluations (also evaluated at 0 and the end)
    eval_seqs: int  # validation sequences per evaluation
    ckpt_every: int  # steps between checkpoints
    vocab_size: int
    tokenizer_chars: int | None  # cap on the training text used to fit the tokenizer
    optimizers: tuple[str, ...]
    proj_gap: int
    rank: int | None = None  # None: hidden // 4
    micro_batch: int | None = None  # None: the whole batch at once (gradient accumulation otherwise)
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak lr
    clip: float = 1.0
    dataset: str | None = None  # None: the embedded corpus
    dataset_config: str | None = None
    lr_table: str = "default"  # which entry of configs/lr.json gives the learning rates

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def train_tokens(self) -> int:
        return self.steps * self.tokens_per_step


DEFAULT_STEPS = 300
DEFAULT_EVALS = 10
DEFAULT_TIMING = (
    "measured: `python -m snsm.bench` (all ten optimizers, fresh cache) took 1395 s wall on the 2-core "
    "machine while other jobs were using it; tokenizer 8 s, tokenizing 5 s; 0.51-0.57 s CPU per step "
    "(AdamW 0.51 s); about 19 minutes on an idle machine"
)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke", model="llama_9m", seq_len=128, batch_size=8, steps=60, eval_every=20,
        eval_seqs=32, ckpt_every=20, vocab_size=2048, tokenizer_chars=2_000_000,
        optimizers=("adamw", "adamw-sn", "adamw-snsm"), proj_gap=6,
    ),
    "default": Preset(
        name="default", model="llama_9m", seq_len=256, batch_size=8, steps=DEFAULT_STEPS,
        eval_every=DEFAULT_STEPS // DEFAULT_EVALS, eval_seqs=64, ckpt_every=100, vocab_size=8192,
        tokenizer_chars=None, optimizers=ALL_OPTIMIZERS, proj_gap=DEFAULT_STEPS // 10,
    ),
}
PRESETS["family"] = dataclasses.replace(PRESETS["default"], name="family",
                                        optimizers=("adamw", "adamw-snsm") + FAMILY + FAMILY_MORE + ADAPTIVE)
PRESETS["refresh"] = dataclasses.replace(PRESETS["default"], name="refresh",
                                         optimizers=("adamw", "adamw-snsm") + REFRESH)

# ``finetune`` (issue 21; ``python -m snsm.bench --task finetune``): fine-tuning a base model the benchmark
# pretrains once and caches (AdamW, 500 steps of 8 x 256 tokens on the corpus without the held-out works,
# about 3 minutes on 2 threads), on two tasks built from the held-out works; the values here are the
# fine-tuning runs': 250 steps of 8 x 128 tokens, each method's lr the best of a 60-step sweep (x0.3, x1, x3). Vocabulary
# 4096 (a third cheaper a step than 8192 at this model size), trained on 4M characters. Measured: docs/bench/finetune_results.md.
PRESETS["finetune"] = Preset(
    name="finetune", model="llama_9m", seq_len=128, batch_size=8, steps=250, eval_every=25, eval_seqs=64,
    ckpt_every=50, vocab_size=4096, tokenizer_chars=4_000_000, optimizers=FINETUNE, proj_gap=30,
)

_PAPER = {"60m": 10_000, "130m": 20_000, "350m": 60_000, "1b": 100_000}
for _size, _steps in _PAPER.items():
    PRESETS[f"paper-{_size}"] = Preset(
        name=f"paper-{_size}", model=f"llama_{_size}", seq_len=256, batch_size=512, steps=_steps,
        eval_every=1000, eval_seqs=2048, ckpt_every=1000, vocab_size=32000, tokenizer_chars=200_000_000,
        optimizers=ALL_OPTIMIZERS, proj_gap=200, micro_batch=64 if _size in ("350m", "1b") else 128,
        dataset="allenai/c4", dataset_config="en", lr_table="paper",
    )


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise BenchError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
