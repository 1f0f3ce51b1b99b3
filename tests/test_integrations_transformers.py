"""snsm in transformers.Trainer (snsm.integrations.transformers): the optimizer factory, the Trainer
mixin, grouping by module type, checkpoints that resume on the same trajectory, steps inside backward
(with and without gradient accumulation, and under DDP on 2 gloo processes). Tiny LlamaForCausalLM
models from a config: nothing is downloaded."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import ROOT

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import snsm  # noqa: E402
from snsm.integrations import OPTIMIZERS, build_optimizer  # noqa: E402
from snsm.integrations.transformers import (SNSMOptimizerFactory, SNSMTrainerMixin,  # noqa: E402
                                            optimizer_cls_and_kwargs)

hf_logging.set_verbosity_error()

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)


def llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}))


def dataset(n=32, length=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": t, "labels": t} for t in torch.randint(0, CONFIG["vocab_size"], (n, length), generator=g)]


class MixinTrainer(SNSMTrainerMixin, Trainer):
    pass


class Pending(TrainerCallback):
    """Before each optimizer step: how many parameters an ordinary step would still step."""

    def __init__(self):
        self.trainer, self.counts = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        self.counts.append(sum(bool(opt.pending(p)) for p in opt.parameters()))
        return control


def arguments(out, steps=6, **kw):
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1000, report_to=[], use_cpu=True, seed=0,
                data_seed=0, dataloader_num_workers=0, save_strategy="no", disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def fit(out, *, kind="factory", name="adamw-snsm", options=None, resume=None, steps=6, callbacks=(), **kw):
    model = llama()
    options = {"lr": 1e-2, "rank": 4, "proj_gap": 2} if options is None else options
    args = arguments(out, steps=steps, **kw)
    if kind == "factory":
        trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(name, **options))
    else:
        trainer = MixinTrainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks),
                               snsm_optimizer=name, snsm_options=options)
    for cb in callbacks:
        cb.trainer = trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def snsm_of(trainer):
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


# ---------------------------------------------------------------- the module and its options

def test_importing_the_integration_does_not_import_transformers():
    code = ("import sys, snsm.integrations.transformers as t; assert 'transformers' not in sys.modules, 'imported';"
            "assert 'adamw-snsm' in t.OPTIMIZERS")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_names_and_bad_options_raise_value_error_naming_the_allowed():
    with pytest.raises(ValueError, match="allowed: adamw-sn, adamw-snsm"):
        optimizer_cls_and_kwargs("adamw-snms")
    with pytest.raises(ValueError, match="takes no option 'learning_rate'.*allowed: lr, betas"):
        optimizer_cls_and_kwargs("adamw-snsm", learning_rate=1e-2)
    with pytest.raises(ValueError, match="adamw-sn takes no option 'rank'.*Subspace-Momentum"):
        optimizer_cls_and_kwargs("adamw-sn", rank=4)
    with pytest.raises(ValueError, match="adamw-snsm: Invalid betas"):
        optimizer_cls_and_kwargs("adamw-snsm", betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="rmsprop-sn: .*lr"):
        optimizer_cls_and_kwargs("rmsprop-sn", lr=-1.0)
    with pytest.raises(ValueError, match="embeddings"):
        optimizer_cls_and_kwargs("adamw-snsm", embeddings="yes")
    with pytest.raises(ValueError, match="SNSMTrainerMixin"):
        optimizer_cls_and_kwargs("adamw-snsm", in_backward=True)
    with pytest.raises(ValueError, match="allowed: adamw-sn"):
        MixinTrainer(model=llama(), args=arguments("unused"), snsm_optimizer="adam")


def test_the_pair_is_a_transformers_optimizer_factory():
    from transformers.trainer_optimizer import is_optimizer_factory

    cls, kwargs = optimizer_cls_and_kwargs("adamw-snsm", lr=1e-2, rank=4)
    assert is_optimizer_factory(cls) and kwargs == {"name": "adamw-snsm", "lr": 1e-2, "rank": 4}
    opt = cls()(llama(), **kwargs)  # how Trainer.create_optimizer calls a factory
    assert isinstance(opt, snsm.AdamWSNSM)
    with pytest.raises(RuntimeError, match="SNSMTrainerMixin"):  # an older Trainer: cls(groups, **kwargs)
        SNSMOptimizerFactory([{"params": []}], **kwargs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_name_builds_and_steps_on_a_llama(name):
    model = llama()
    options = {"rank": 4, "proj_gap": 2} if OPTIMIZERS[name].subspace else {}
    opt = build_optimizer(model, name, **options)
    assert isinstance(opt, OPTIMIZERS[name].cls)
    before = [p.detach().clone() for p in model.parameters()]
    x = dataset(4)[0]["input_ids"][None]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters()))


# ---------------------------------------------------------------- grouping by module type

@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("name", ["adamw-snsm", "adamw-snsm-emb"])
def test_grouping_embeddings_norms_linear_weights_and_the_head(name, tie):
    model = llama(tie_word_embeddings=tie)
    opt = build_optimizer(model, name, rank=4)
    embeddings = name == "adamw-snsm-emb"
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert (head is emb) == tie
    for norm in (model.model.norm.weight, model.model.layers[0].input_layernorm.weight):
        assert group_of(opt, norm)["subset_size"] is None and group_of(opt, norm)["rank"] is None
    for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj):
        g = group_of(opt, layer.weight)
        assert g["rank"] == 4 and g.get("subset_size", opt.defaults["subset_size"]) == "auto"
    compressed = lambda p: group_of(opt, p)["rank"] == 4  # noqa: E731
    assert compressed(emb) == embeddings
    assert compressed(head) == (embeddings or not tie)  # an untied head is a Linear; a tied one follows the embedding
    # state after a step: embedding coordinate-wise, a Linear weight one value per row of the tall frame
    x = dataset(2)[0]["input_ids"][None]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    up = model.model.layers[0].mlp.up_proj.weight
    assert opt.state[up]["exp_avg_sq"].numel() == max(up.shape)
    assert (opt.state[emb]["exp_avg_sq"].numel() == emb.numel()) == (not embeddings)


def test_weight_decay_spares_vectors_and_aux_lr_sets_the_coordinate_wise_lr():
    model = llama()
    opt = build_optimizer(model, "adamw-snsm", lr=1e-2, weight_decay=0.1, aux_lr=1e-3, rank=4)
    norm, emb = model.model.norm.weight, model.model.embed_tokens.weight
    linear = model.model.layers[0].mlp.up_proj.weight
    assert group_of(opt, norm)["weight_decay"] == 0.0 and group_of(opt, norm)["lr"] == 1e-3
    assert group_of(opt, emb)["weight_decay"] == 0.1 and group_of(opt, emb)["lr"] == 1e-3
    assert group_of(opt, linear)["weight_decay"] == 0.1 and group_of(opt, linear)["lr"] == 1e-2
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_the_pitfall_a_class_in_optimizer_cls_and_kwargs_compresses_the_embedding(tmp_path):
    """What the factory is for: given a class, Trainer hands it its own decay / no-decay groups."""
    naive = Trainer(model=llama(), args=arguments(tmp_path), train_dataset=dataset(),
                    optimizer_cls_and_kwargs=(snsm.AdamWSNSM, {"lr": 1e-2, "rank": 4}))
    emb = naive.model.model.embed_tokens.weight
    g = group_of(naive.create_optimizer(), emb)
    assert g["rank"] == 4 and g["subset_size"] == "auto"  # the embedding under SN/SM: nothing warns
    ours = Trainer(model=llama(), args=arguments(tmp_path), train_dataset=dataset(),
                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamw-snsm", lr=1e-2, rank=4))
    emb = ours.model.model.embed_tokens.weight
    assert group_of(ours.create_optimizer(), emb)["subset_size"] is None


# ---------------------------------------------------------------- Trainer: train, checkpoint, resume

@pytest.mark.parametrize("kind,name", [("factory", "adamw-snsm"), ("mixin", "adagrad-snsm")])
def test_trainer_resumes_on_the_uninterrupted_trajectory(tmp_path, kind, name):
    options = {"lr": 1e-2, "rank": 4, "proj_gap": 2}  # refreshes before and after the checkpoint
    full, trainer = fit(tmp_path / "a", kind=kind, name=name, options=options, save_strategy="steps", save_steps=3,
                        save_only_model=False)
    assert isinstance(snsm_of(trainer), OPTIMIZERS[name].cls)
    assert (tmp_path / "a" / "checkpoint-3" / "optimizer.pt").is_file()
    # Trainer loads optimizer.pt with weights_only=True: the state is tensors and plain values only
    torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert max_diff(full, llama()) > 1e-3
    resumed, _ = fit(tmp_path / "b", kind=kind, name=name, options=options,
                     resume=str(tmp_path / "a" / "checkpoint-3"))
    assert max_diff(full, resumed) == 0.0


def test_mixin_takes_lr_and_weight_decay_from_the_arguments_unless_given(tmp_path):
    t = MixinTrainer(model=llama(), args=arguments(tmp_path, learning_rate=3e-2, weight_decay=0.05),
                     train_dataset=dataset(), snsm_optimizer="adamw-sn")
    opt = t.create_optimizer()
    assert isinstance(opt, snsm.AdamWSN)
    assert {g["lr"] for g in opt.param_groups} == {3e-2}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    t = MixinTrainer(model=llama(), args=arguments(tmp_path, learning_rate=3e-2), train_dataset=dataset(),
                     snsm_optimizer="rmsprop-sn", snsm_options={"lr": 1e-3})
    assert {g["lr"] for g in t.create_optimizer().param_groups} == {1e-3}


def test_snsm_trainer_is_the_mixin_on_trainer(tmp_path):
    from snsm.integrations.transformers import SNSMTrainer

    assert issubclass(SNSMTrainer, SNSMTrainerMixin) and issubclass(SNSMTrainer, Trainer)
    t = SNSMTrainer(model=llama(), args=arguments(tmp_path), snsm_optimizer="sgd-sm", snsm_options={"rank": 4})
    assert isinstance(t.create_optimizer(), snsm.SGDSM)
    with pytest.raises(ValueError, match="snsm_optimizer"):
        SNSMTrainer(model=llama(), args=arguments(tmp_path),
                    optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adamw-sn"))


# ---------------------------------------------------------------- steps inside backward

@pytest.mark.parametrize("ga", [1, 2])
def test_in_backward_follows_the_ordinary_trajectory(tmp_path, ga):
    plain_cb, inb_cb = Pending(), Pending()
    plain, _ = fit(tmp_path / "p", kind="mixin", gradient_accumulation_steps=ga, max_grad_norm=0, steps=4,
                   callbacks=[plain_cb])
    inb, trainer = fit(tmp_path / "i", kind="mixin", gradient_accumulation_steps=ga, max_grad_norm=0, steps=4,
                       options={"lr": 1e-2, "rank": 4, "proj_gap": 2, "in_backward": True}, callbacks=[inb_cb])
    n = len(list(snsm_of(trainer).parameters()))
    assert plain_cb.counts == [n] * 4  # ordinary: every parameter waits for opt.step()
    assert inb_cb.counts == [0] * 4  # in backward: all stepped before Trainer calls opt.step()
    assert all(p.grad is None for p in inb.parameters())  # freed
    assert max_diff(plain, inb) == 0.0 and max_diff(plain, llama()) > 1e-3


def test_in_backward_needs_trainers_clipping_off_and_clips_itself(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        MixinTrainer(model=llama(), args=arguments(tmp_path), train_dataset=dataset(),
                     snsm_options={"rank": 4, "in_backward": True})
    with pytest.raises(ValueError, match="clip needs in_backward"):
        MixinTrainer(model=llama(), args=arguments(tmp_path, max_grad_norm=0), snsm_options={"clip": "tensor"})
    with pytest.raises(ValueError, match="Invalid clip"):
        MixinTrainer(model=llama(), args=arguments(tmp_path, max_grad_norm=0),
                     snsm_options={"in_backward": True, "clip": "global"})
    clipped, _ = fit(tmp_path / "c", kind="mixin", max_grad_norm=0, steps=3,
                     options={"lr": 1e-2, "rank": 4, "in_backward": True, "clip": "tensor", "max_norm": 1e-3})
    free, _ = fit(tmp_path / "f", kind="mixin", max_grad_norm=0, steps=3,
                  options={"lr": 1e-2, "rank": 4, "in_backward": True})
    assert max_diff(clipped, free) > 0 and all(torch.isfinite(p).all() for p in clipped.parameters())


# ---------------------------------------------------------------- DDP (2 gloo processes)

@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs gloo")
def test_ddp_trainer_in_backward_follows_ordinary_steps(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "trainer_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for ga in ("ga1", "ga2"):
        r = result[ga]
        assert r["world"] == 2 and r["wrapped"] == "DistributedDataParallel"
        assert r["ranks_agree"] and r["moved"] > 1e-3
        assert r["max_diff"] == 0.0, r
        assert set(r["pending_in_backward"]) == {0} and 0 not in r["pending_plain"]


# ---------------------------------------------------------------- LoFT on a peft model, by name

def test_loft_names_build_on_the_peft_model_and_train_in_trainer(tmp_path):
    """"loft" / "loft-sn" build snsm.LoFTAdamW on the model Trainer trains (a peft LoRA llama): LoFT
    state on every LoRA factor, the base weights frozen, the loss going down; grouping options refused."""
    peft = pytest.importorskip("peft")
    for name, second_moment in (("loft", "full"), ("loft-sn", "subset")):
        model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        data = dataset(n=2)  # one batch, seen every step: its loss must go down
        x = torch.stack([d["input_ids"] for d in data])
        with torch.no_grad():
            before = model(input_ids=x, labels=x).loss.item()
        trainer = Trainer(model=model, args=arguments(tmp_path / name, steps=8), train_dataset=data,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(name, lr=3e-2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        opt = snsm_of(trainer)
        assert isinstance(opt, snsm.LoFTAdamW)
        assert all(g["second_moment"] == second_moment for g in opt.param_groups)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert len(lora) == 4 and all("partner" in opt.state[p] for p in lora)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        with torch.no_grad():
            after = model(input_ids=x, labels=x).loss.item()
        assert after < before - 0.05, (before, after)
    with pytest.raises(ValueError, match="loft takes no option 'embeddings'"):
        build_optimizer(llama(), "loft", embeddings=True)
