"""The fine-tuning benchmark (``python -m snsm.bench --task finetune``): end to end on a shrunken
configuration (sequence 64, a few steps, a 512-token vocabulary, a base pretrained for 8 steps), the
held-out split, the classification labels, what the adapter runs train, their state, the outputs,
resume after a stop, and one-line errors.

The end-to-end run (AdamW and LoRA + AdamW, both tasks) takes about 40 s on one core; the resume
check reruns one method twice and is marked slow.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the benchmark needs the [bench] extra (transformers)")
pytest.importorskip("tokenizers", reason="the benchmark needs the [bench] extra (tokenizers)")
pytest.importorskip("matplotlib", reason="the benchmark needs the [bench] extra (matplotlib)")
pytest.importorskip("peft", reason="the fine-tuning benchmark's adapters need peft")

from snsm.bench import finetune as ft  # noqa: E402
from snsm.bench import finetune_data as fd  # noqa: E402
from snsm.bench.cli import main  # noqa: E402
from conftest import run_bench as bench  # noqa: E402

METHODS = ["adamw", "lora-adamw"]
TINY = ["--task", "finetune", "--seq-len", "64", "--batch-size", "4", "--steps", "6", "--eval-every", "3",
        "--eval-seqs", "8", "--ckpt-every", "3", "--vocab-size", "512", "--base-steps", "8", "--sweep-steps", "2",
        "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ft-cache")


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("ft-run")
    proc = bench(*TINY, "--optimizers", ",".join(METHODS), "--out", str(out), "--cache-dir", str(cache))
    return out, proc, json.loads((out / "summary.json").read_text())


def _entries(summary: dict, task: str) -> dict:
    return {e["method"]: e for e in summary["tasks"][task]["methods"]}


def test_end_to_end_outputs(ft_run):
    out, proc, s = ft_run
    assert s["preset"] == "finetune" and s["task"] == "finetune"
    assert s["tokens"] == 6 * 4 * 64 and s["adapter_rank"] == 8
    assert s["base"]["steps"] == 8 and s["base"]["held_out"] == fd.HELD_OUT_SOURCE
    for task in ft.TASKS:
        t = s["tasks"][task]
        assert t["reference"] == "adamw"
        entries = _entries(s, task)
        assert list(entries) == METHODS
        for m, e in entries.items():
            assert not e["skipped"], (task, m, e.get("reason"))
            assert [c[0] for c in e["curve"]] == [0, 768, 1536]  # step 0, every 3 steps, the end
            assert e["final_metric"] == e["curve"][-1][2] and e["final_val_loss"] == e["curve"][-1][1]
            assert len(e["sweep"]) == 3 and e["lr"] in [p["lr"] for p in e["sweep"]]
            assert e["step_time_s"] > 0 and e["state_bytes"] > 0
            assert (out / m / task / "main" / "curve.csv").exists()
        assert entries["adamw"]["tokens_to_adamw_final"] is not None
        assert t["adamw_final"] == entries["adamw"]["final_metric"]
    lm, cls = _entries(s, "lm")["adamw"], _entries(s, "cls")["adamw"]
    assert lm["final_metric"] == pytest.approx(np.exp(lm["final_val_loss"]))  # perplexity
    assert 0 <= cls["final_metric"] <= 1  # accuracy
    for name in ("summary.json", "results.md", "sweep.md", "sweep.json", "config.json"):
        assert (out / name).stat().st_size > 0, name
    for task in ft.TASKS:
        assert (out / f"finetune_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "Command: `python -m snsm.bench --task finetune" in md
    assert "finetune_lm.png" in md and "finetune_cls.png" in md and "## Learning-rate sweep" in md
    assert md.count("| lora-adamw | adapter |") == 2 and "| lora-adamw | 0.00" in md  # both tables, the sweep
    assert "| adamw | full |" in proc.stdout  # the tables are printed at the end
    sweep = json.loads((out / "sweep.json").read_text())
    assert set(sweep["tasks"]) == set(ft.TASKS) and sweep["tasks"]["lm"]["adamw"]["points"]


def test_lora_runs_train_only_adapters_and_head_and_keep_less_state(ft_run):
    _, _, s = ft_run
    for task in ft.TASKS:
        e = _entries(s, task)
        full, lora = e["adamw"], e["lora-adamw"]
        assert lora["trainable_params"] == lora["peft_trainable_params"]  # peft's own count
        assert full["trainable_params"] == full["total_params"] and full["peft_trainable_params"] is None
        assert lora["trainable_params"] < full["trainable_params"] / 5
        assert lora["state_bytes"] < full["state_bytes"] / 5
        assert lora["total_params"] > full["total_params"]  # the base weights, frozen, plus the adapters


@pytest.mark.parametrize("method", ["lora-adamw", "dora-adamw", "loft", "lora-adamw-sn"])
def test_adapter_model_trains_only_factors_and_the_new_head(tmp_path, method):
    import torch

    from snsm.bench.model import build_model
    base = tmp_path / "base.pt"
    torch.save(build_model("llama_9m", 300, 32, 0).state_dict(), base)
    job = {"model": "llama_9m", "vocab_size": 300, "seq_len": 32, "seed": 0, "base_path": str(base), "n_classes": 3,
           "adapter_rank": 4, "method": method, "clip": 1.0, "rank": 8, "proj_gap": 10}
    for task in ft.TASKS:
        model = ft.build_task_model({**job, "task": task})
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        allowed = ("lora_A", "lora_B", "lora_magnitude_vector") + (("modules_to_save.default",) if task == "cls" else ())
        assert names and all(any(a in n for a in allowed) for n in names), names
        assert any("lora_A" in n for n in names) and (task == "lm" or any("head" in n for n in names))
        if method == "dora-adamw":
            assert any("lora_magnitude_vector" in n for n in names)
        assert ft.count_trainable(model) == model.get_nb_trainable_parameters()[0]
        opt = ft.build_optimizer({**job, "task": task}, model, 1e-3)
        stepped = {id(p) for g in opt.param_groups for p in g["params"]}
        assert stepped == {id(p) for p in model.parameters() if p.requires_grad}


def test_held_out_works_never_appear_in_the_pretraining_split():
    train, val, held = fd.pretraining_documents()
    assert held and all(d["source"] == fd.HELD_OUT_SOURCE for d in held)
    assert not any(d["source"] == fd.HELD_OUT_SOURCE for d in train + val)
    pretraining = "\x00".join(d["text"] for d in train + val)
    for d in held:  # no passage of a held-out document in any pretraining document
        middle = len(d["text"]) // 2
        assert d["text"][middle:middle + 300] not in pretraining, d["title"]
    assert len({fd.work_of(d["title"]) for d in held}) >= 4


def test_head_tail_split_is_disjoint_and_covers_every_document():
    ids = np.arange(1000, dtype=np.int32)
    head, tail = fd.head_tail(ids)
    assert len(tail) == round(fd.VAL_FRACTION * 1000) and np.array_equal(np.concatenate([head, tail]), ids)
    assert fd.work_of("Paradise Lost, Book IV") == "Paradise Lost"
    assert fd.work_of("Comus (ed. William Bell, with introduction and notes)") == "Comus"


def _occurs(needle: np.ndarray, haystacks: list[np.ndarray]) -> bool:
    n = needle.astype(np.int32).tobytes()
    for h in haystacks:
        raw = h.astype(np.int32).tobytes()
        i = raw.find(n)
        while i >= 0:
            if i % 4 == 0:
                return True
            i = raw.find(n, i + 1)
    return False


def test_classification_passages_come_from_the_work_of_their_label(ft_run):
    """Re-encode the held-out documents with the run's tokenizer, independently of the task's data
    path, and find every passage (its first or last 16 tokens: a passage may join two documents of
    its work) in a document of the work its label names, and in the right part of it."""
    from tokenizers import Tokenizer
    out, _, s = ft_run
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    _, _, held = fd.pretraining_documents()
    works = s["data"]["works"]
    enc = fd.encode_documents(tok, held, eos)
    heads = {w: [fd.head_tail(ids)[0] for d, ids in zip(held, enc) if fd.work_of(d["title"]) == w] for w in works}
    tails = {w: [fd.head_tail(ids)[1] for d, ids in zip(held, enc) if fd.work_of(d["title"]) == w] for w in works}
    z = np.load(out / "data" / "cls.npz")
    n = len(works)
    passages = fd.Passages([z[f"train_{i}"] for i in range(n)], 64, 8, seed=0)
    seen = set()
    for step in range(6):
        x, y = passages.batch(step)
        for row, label in zip(x.numpy(), y.tolist()):
            seen.add(label)
            assert _occurs(row[:16], heads[works[label]]) or _occurs(row[-16:], heads[works[label]])
    assert len(seen) >= n - 1  # classes drawn uniformly
    xv, yv = fd.val_passages([z[f"val_{i}"] for i in range(n)], 64, 4)
    assert np.bincount(yv.numpy()).tolist() == [len(yv) // n] * n  # balanced
    for row, label in zip(xv.numpy(), yv.tolist()):
        assert _occurs(row[:16], tails[works[label]]) or _occurs(row[-16:], tails[works[label]])


def test_lm_streams_keep_validation_apart():
    a, b = np.arange(50, dtype=np.int32), np.arange(100, 200, dtype=np.int32)
    train, val = fd.lm_streams([a, b])
    assert not set(train.tolist()) & set(val.tolist())
    assert len(val) == round(fd.VAL_FRACTION * 50) + round(fd.VAL_FRACTION * 100)


def test_tokens_to_reach_and_skipped_peer_in_the_table():
    curve = [[0, 2.0, 0.2], [10, 1.5, 0.5], [20, 1.2, 0.7]]
    assert ft.tokens_to_reach(curve, 0.5, higher=True) == 10
    assert ft.tokens_to_reach(curve, 0.1, higher=False) is None
    done = {"task": "cls", "method": "adamw", "status": "done", "lr": 1e-3, "final_metric": 0.7, "final_val_loss": 1.2,
            "curve": curve, "trainable_params": 10, "state_bytes": 80, "step_time_s": 0.1, "kind": "full"}
    skipped = {"task": "cls", "method": "galore", "status": "skipped", "lr": 3e-3,
               "reason": "galore-torch not importable: ModuleNotFoundError"}
    s = ft.build_ft_summary({}, [done, skipped, {**done, "task": "lm", "final_metric": 3.3}])
    table = ft.format_ft_table(s, "cls")
    assert "| galore | full | - | skipped: galore-torch not importable" in table
    assert "| adamw | full | 0.001 | 0.700 |" in table


def test_galore_is_a_skipped_peer_when_missing(tmp_path):
    import torch

    from snsm.bench.model import build_model
    from snsm.bench.optimizers import PeerUnavailable
    try:
        import galore_torch  # noqa: F401
        pytest.skip("galore-torch is installed here")
    except ImportError:
        pass
    base = tmp_path / "base.pt"
    torch.save(build_model("llama_9m", 300, 32, 0).state_dict(), base)
    job = {"model": "llama_9m", "vocab_size": 300, "seq_len": 32, "seed": 0, "base_path": str(base), "n_classes": 3,
           "adapter_rank": 4, "method": "galore", "task": "lm", "clip": 1.0, "rank": 8, "proj_gap": 10}
    with pytest.raises(PeerUnavailable):
        ft.build_optimizer(job, ft.build_task_model(job), 1e-3)


@pytest.mark.slow
def test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends(ft_run, tmp_path, cache):
    out, _, s = ft_run
    args = [*TINY, "--optimizers", "lora-adamw", "--out", str(tmp_path), "--cache-dir", str(cache)]
    proc = bench(*args, "--stop-after", "8")  # in the LM task's full run, after the sweep's 6 steps
    assert not (tmp_path / "summary.json").exists() and "--resume" in proc.stderr
    assert (tmp_path / "lora-adamw" / "lm" / "main" / "checkpoint.pt").exists()
    bench(*args, "--resume")
    resumed = json.loads((tmp_path / "summary.json").read_text())
    for task in ft.TASKS:
        a, b = _entries(s, task)["lora-adamw"], _entries(resumed, task)["lora-adamw"]
        assert b["curve"] == a["curve"] and b["sweep"] == a["sweep"] and b["lr"] == a["lr"], task


@pytest.mark.parametrize("argv, message", [
    (["--task", "finetune", "--optimizers", "adamw,nope"], "unknown fine-tuning method 'nope'"),
    (["--task", "finetune", "--preset", "default"], "--task finetune runs the finetune preset"),
    (["--task", "pretrain", "--preset", "finetune"], "drop --task pretrain"),
    (["--preset", "finetune", "--in-backward"], "--in-backward is not an option of the fine-tuning benchmark"),
    (["--task", "finetune", "--base-steps", "0"], "--base-steps must be >= 1"),
    (["--task", "finetune", "--lr", "lora-adamw=x"], "is not a number"),
    (["--task", "finetune", "--sweep-factors", "1,-2"], "--sweep-factors must be positive"),
    (["--preset", "smoke", "--sweep-steps", "3"], "is an option of the fine-tuning benchmark"),
    (["--task", "nope"], "invalid choice"),
])
def test_bad_input_is_one_line_error(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snsm-bench: error:") and message in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
