"""Worker for tests/test_integrations_transformers.py under torch.distributed.run (2 CPU processes, gloo).

Trains a tiny LlamaForCausalLM with ``transformers.Trainer`` and snsm's Trainer mixin, ordinary
steps and steps inside backward (with and without gradient accumulation), and writes what the test
checks to ``--out`` (rank 0): the largest weight difference between the two modes, whether the
ranks hold the same weights, and the wrapper Trainer put around the model.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer_worker.py [--out result.json]
"""
import argparse
import json
import os
import tempfile
import warnings

warnings.simplefilter("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from snsm.integrations.transformers import SNSMTrainerMixin  # noqa: E402

hf_logging.set_verbosity_error()

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)


class Trainer_(SNSMTrainerMixin, Trainer):
    pass


class Pending(TrainerCallback):
    """Counts, before each optimizer step, the parameters an ordinary step would still step
    (``opt.pending``): all of them with ordinary steps, none when they stepped inside backward."""

    def __init__(self):
        self.trainer = None
        self.pending = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = self.trainer.optimizer
        opt = getattr(opt, "optimizer", opt)
        self.pending.append(sum(bool(opt.pending(p)) for p in opt.parameters()))
        return control


def train(out_dir, in_backward, ga, steps):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (64, 8), generator=g)]
    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=ga, learning_rate=1e-2, max_grad_norm=0, report_to=[],
                             use_cpu=True, seed=0, data_seed=0, save_strategy="no", disable_tqdm=True,
                             logging_steps=1000, dataloader_num_workers=0,
                             ddp_find_unused_parameters=False)
    options = {"lr": 1e-2, "rank": 4, "proj_gap": 2}
    if in_backward:
        options["in_backward"] = True
    pending = Pending()
    trainer = Trainer_(model=model, args=args, train_dataset=data, snsm_optimizer="adamw-snsm",
                       snsm_options=options, callbacks=[pending])
    pending.trainer = trainer
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in trainer.model.parameters()]
    return [p.clone() for p in params], wrapped, pending.pending


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the result here as JSON (default: print it)")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as d:
        for ga in (1, 2):
            plain, wrapped, pending_plain = train(d, False, ga, a.steps)
            inb, _, pending_inb = train(d, True, ga, a.steps)
            diff = max((p - q).abs().max().item() for p, q in zip(plain, inb))
            flat = torch.cat([p.flatten() for p in inb])
            gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            result[f"ga{ga}"] = {"max_diff": diff, "ranks_agree": all(torch.equal(gathered[0], x) for x in gathered),
                                 "wrapped": wrapped, "world": dist.get_world_size(),
                                 "pending_plain": pending_plain, "pending_in_backward": pending_inb,
                                 "moved": (flat - torch.cat([p.flatten() for p in _initial()])).abs().max().item()}
    if dist.get_rank() == 0:
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f)
        else:
            print(json.dumps(result, indent=1))


def _initial():
    torch.manual_seed(0)
    return [p.detach() for p in LlamaForCausalLM(LlamaConfig(**CONFIG)).parameters()]


if __name__ == "__main__":
    main()
