"""Evaluation during training: sharding, metrics by hand, and the Evaluate callback through a real tiny DPO fit."""

import glob
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from vlalign.backbone import BackboneConfig, LoraSpec
from vlalign.data.module import ShardDataModule
from vlalign.dpo import DPOModule
from vlalign.evaluation import (ChairTask, Evaluate, PopeTask, RewardAccuracyTask, gather_results, markdown_table,
                                pope_scalars, rank_batches, subset)
from vlalign.metrics.chair import build_vocab, score_caption
from vlalign.optim import OptimConfig


# ------------------------------------------------------------------------------------------------ sharding
def test_rank_batches_cover_everything_once_with_equal_call_counts():
    # 5 examples, 2 ranks, 2 per batch: rank 0 takes 0, 2, 4; rank 1 takes 1, 3 and pads a third call
    assert rank_batches(5, 0, 2, 2) == [[0, 2], [4]]
    assert rank_batches(5, 1, 2, 2) == [[1, 3], []]
    assert rank_batches(1, 1, 2, 4) == [[]]  # fewer examples than ranks: rank 1 still makes its call
    assert rank_batches(0, 0, 2, 4) == []
    for n in range(0, 12):
        for world in (1, 2, 3):
            shares = [rank_batches(n, r, world, 3) for r in range(world)]
            assert len({len(s) for s in shares}) == 1  # same number of model calls on every rank
            assert sorted(i for s in shares for b in s for i in b) == list(range(n))
    with pytest.raises(ValueError, match="rank"):
        rank_batches(4, 2, 2, 1)


def test_gather_sorts_by_index_without_a_process_group():
    assert gather_results([{"index": 2}, {"index": 0}], world=1) == [{"index": 0}, {"index": 2}]


def test_subset_first_n_or_seeded():
    assert subset(10, 3, None) == [0, 1, 2]
    assert subset(3, 10, None) == [0, 1, 2] and subset(3, None, 7) == [0, 1, 2]
    drawn = subset(100, 5, seed=1)
    assert drawn == subset(100, 5, seed=1) == sorted(drawn) and len(set(drawn)) == 5 and drawn != [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------- metrics by hand
def test_pope_scalars_by_hand():
    results = [{"split": "random", "label": lab, "pred": pred}
               for lab, pred in [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no")]]
    results += [{"split": "adversarial", "label": lab, "pred": "yes"} for lab in ("yes", "no", "no")]
    m = pope_scalars(results)
    # random: tp 1, fn 1, fp 1, tn 1 -> accuracy 0.5, precision 0.5, recall 0.5, f1 0.5, yes-ratio 0.5
    assert [m[f"pope_random/{k}"] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == [0.5] * 5
    # adversarial: tp 1, fp 2 -> accuracy 1/3, precision 1/3, recall 1, f1 = 2 (1/3)(1) / (4/3) = 1/2, yes-ratio 1
    assert m["pope_adversarial/accuracy"] == pytest.approx(1 / 3)
    assert m["pope_adversarial/precision"] == pytest.approx(1 / 3)
    assert m["pope_adversarial/recall"] == 1.0 and m["pope_adversarial/yes_ratio"] == 1.0
    assert m["pope_adversarial/f1"] == pytest.approx(0.5)
    assert list(m)[0].startswith("pope_random/")  # splits in order of first appearance


def test_chair_and_reward_task_metrics_by_hand():
    vocab = build_vocab({"circle": ["disc"], "square": [], "star": []})
    details = [score_caption("A red circle and a blue star.", ["circle"], vocab),   # star hallucinated
               score_caption("Two discs and a square.", ["circle", "square"], vocab),  # none
               score_caption("Nothing.", ["star"], vocab)]
    task = ChairTask()
    m = task.metrics([{"index": i, **d} for i, d in enumerate(details)])
    assert m["chair/chair_s"] == pytest.approx(1 / 3)       # caption 1 of 3
    assert m["chair/chair_i"] == pytest.approx(1 / 4)       # star of circle, star, circle, square
    assert m["chair/recall"] == pytest.approx(3 / 4)        # circle; circle, square; - of 1 + 2 + 1
    assert m["chair/objects_per_caption"] == pytest.approx(4 / 3)

    task = RewardAccuracyTask(group_by="corruption")
    rows = [("a", 1.0, 0.0, "colour"), ("b", 0.5, 0.5, "colour"), ("c", -1.0, 2.0, "count"), ("d", 3.0, 1.0, None)]
    m = task.metrics([{"index": i, "id": n, "chosen": c, "rejected": r, "group": g}
                      for i, (n, c, r, g) in enumerate(rows)])
    assert m["reward/accuracy"] == 0.5  # a and d right; b a tie (wrong); c wrong
    assert m["reward/margin_mean"] == pytest.approx((1.0 + 0.0 - 3.0 + 2.0) / 4)
    assert m["reward/by_corruption/colour"] == 0.5 and m["reward/by_corruption/count"] == 0.0
    assert m["reward/by_corruption/(none)"] == 1.0 and m["reward/skipped"] == 0.0


def test_markdown_table_escapes_cells():
    md = markdown_table([{"id": "1", "question": "a|b", "answer": "x\ny", "truth": "yes"}])
    assert md.splitlines() == ["| id | question | answer | truth |", "|---|---|---|---|", "| 1 | a\\|b | x y | yes |"]


def test_shapes_paths_need_a_datamodule():
    with pytest.raises(ValueError, match="shapes_dir"):
        PopeTask().setup(None)
    with pytest.raises(ValueError, match="has no DataModule"):
        ChairTask().setup(None)


# ------------------------------------------------------------------------------------- with the tiny model
@pytest.fixture(scope="module")
def base(tmp_path_factory, make_backbone):
    out = tmp_path_factory.mktemp("eval") / "base"
    make_backbone().export_merged(str(out))
    return str(out)


def _dpo(base):
    torch.manual_seed(0)
    cfg = BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_vision=False,
                         train_projector=False)
    return DPOModule(cfg, OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))


def test_two_ranks_give_the_single_rank_results(base, shapes_dir):
    """Rank 0 and rank 1 of a world of 2, run one after the other, answer and score exactly what one rank does."""
    module = _dpo(base)
    module.configure_model()
    module.eval()
    for task in (PopeTask(limit=3, batch_size=1, max_new_tokens=4), RewardAccuracyTask(limit=5, batch_size=2)):
        task.setup(shapes_dir)
        with torch.no_grad():
            one = gather_results(task.run(module, 0, 1), 1)
            two = gather_results(task.run(module, 0, 2) + task.run(module, 1, 2), 1)
        assert [r["index"] for r in two] == list(range(len(one)))
        if isinstance(task, PopeTask):
            assert two == one and {r["split"] for r in one} == {"random", "popular", "adversarial"}
        else:  # batch composition differs (2 vs 1 pairs per forward): same scores to float precision
            assert [r["id"] for r in two] == [r["id"] for r in one]
            assert [r["chosen"] for r in two] == pytest.approx([r["chosen"] for r in one], abs=1e-5)
        assert task.metrics(two) == pytest.approx(task.metrics(one), abs=1e-5)


def _fit_with_evaluation(base, shapes_dir, root):
    module = _dpo(base)
    dm = ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar", val=f"{shapes_dir}/preference/val-*.tar",
                         shapes_dir=shapes_dir, batch_size=4, val_batch_size=4, num_workers=0, max_length=256)
    ev = Evaluate([PopeTask(limit=4, batch_size=8), ChairTask(limit=3, max_new_tokens=12),
                   RewardAccuracyTask(limit=6, batch_size=6)], every_n_validations=2, samples=2)
    logger = TensorBoardLogger(str(root), name="eval", version="")
    L.Trainer(max_steps=5, val_check_interval=2, limit_val_batches=1, accelerator="cpu", logger=logger,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=1, callbacks=[ev]).fit(module, dm)
    return ev, str(root / "eval")


def test_callback_in_a_real_fit_logs_every_n_validations_and_at_the_end(base, shapes_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev, logdir = _fit_with_evaluation(base, shapes_dir, tmp_path / "a")
    # validations after steps 2 and 4 (the sanity check does not count): every 2nd -> step 4; fit ends at step 5
    assert ev.validations == 2
    assert [step for step, _ in ev.history] == [4, 5]
    scalars = ev.history[-1][1]
    expected = {f"eval/pope_{s}/{k}" for s in ("random", "popular", "adversarial")
                for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    expected |= {"eval/chair/chair_i", "eval/chair/chair_s", "eval/chair/recall", "eval/reward/accuracy",
                 "eval/reward/margin_mean", "eval/seconds"}
    assert expected <= set(scalars)
    assert all(math.isfinite(v) for v in scalars.values())

    ea = EventAccumulator(logdir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    ea.Reload()
    assert {"eval/pope_adversarial/accuracy", "eval/chair/chair_s", "eval/reward/accuracy"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("eval/pope_random/f1")] == [4, 5]
    text = ea.Tensors("eval/pope/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("| id | question | answer | truth |") and "Is there a" in text
    assert len(text.splitlines()) == 2 + 2  # header, rule, 2 samples
    assert "eval/history" in ea.Tags()["images"]
    assert glob.glob(f"{logdir}/events.out.tfevents*")

    # deterministic: a second identical run gives the same figures (the wall time aside)
    ev2, _ = _fit_with_evaluation(base, shapes_dir, tmp_path / "b")
    for (s1, m1), (s2, m2) in zip(ev.history, ev2.history):
        m1, m2 = (dict(m) for m in (m1, m2))
        m1.pop("eval/seconds"), m2.pop("eval/seconds")
        assert s1 == s2 and m1 == m2


def test_the_interface_is_checked():
    with pytest.raises(TypeError, match="task interface"):
        Evaluate([SimpleNamespace(name="x")])
    with pytest.raises(ValueError, match="share a name"):
        Evaluate([PopeTask(), PopeTask()])


def test_a_shapes_task_without_the_world_is_left_out_with_a_warning(tmp_path, caplog):
    trainer = SimpleNamespace(datamodule=ShardDataModule(train="x.tar", shapes_dir=str(tmp_path / "none")))
    ev = Evaluate([PopeTask(), ChairTask(prompts=str(tmp_path / "p.jsonl"), vocab=str(tmp_path / "v.json"),
                                         gt=str(tmp_path / "g.json"))])
    with pytest.raises(FileNotFoundError):  # a file given by path must exist
        ev.setup(trainer, None, "fit")
    ev = Evaluate([PopeTask()])
    ev.setup(trainer, None, "fit")
    assert ev.active == [] and "no shapes world under data.shapes_dir" in caplog.text


ZERO_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {here!r})
import lightning as L
import torch
from deepspeed_cpu import CPUDeepSpeedStrategy
from vlalign.backbone import BackboneConfig, LoraSpec
from vlalign.data.module import ShardDataModule
from vlalign.dpo import DPOModule
from vlalign.evaluation import ChairTask, Evaluate, PopeTask
from vlalign.optim import OptimConfig

base, shapes, stage, devices = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
L.seed_everything(0)
# lr 1e-12: the one training step leaves greedy answers as they were, so the runs compare evaluation alone
module = DPOModule(BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_projector=False),
                   OptimConfig(lr=1e-12, schedule="constant", warmup_steps=0))
dm = ShardDataModule(train=f"{{shapes}}/preference/train-*.tar", val=None, shapes_dir=shapes, batch_size=2,
                     num_workers=0, shuffle_buffer=0, max_length=256)
ev = Evaluate([PopeTask(limit=5, batch_size=2, max_new_tokens=3), ChairTask(limit=3, batch_size=2, max_new_tokens=8)],
              every_n_validations=0, at_fit_end=True, samples=0, plot=False)
strategy = CPUDeepSpeedStrategy(stage=stage) if stage else "auto"
trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[ev])
trainer.fit(module, dm)
if trainer.is_global_zero:
    print("RESULT " + json.dumps({{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")
                                  and "seconds" not in k}}))
"""


def test_zero3_on_two_ranks_gives_the_single_process_figures(base, shapes_dir, tmp_path):
    """Two CPU processes under ZeRO-3 (the test-only strategy): each answers its share with partitioned weights,
    generation keeps the ranks in step, and the gathered figures equal one plain process's."""
    import json
    import os
    import socket
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "zero_eval.py"
    script.write_text(ZERO_SCRIPT.format(here=here))
    out = {}
    for stage, devices in ((0, 1), (3, 2)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, str(script), base, shapes_dir, str(stage), str(devices)],
                             capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
        lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
        assert res.returncode == 0 and lines, res.stdout[-2000:] + res.stderr[-4000:]
        out[stage] = json.loads(lines[-1][7:])
    assert "eval/pope_random/accuracy" in out[0] and "eval/chair/chair_i" in out[0]
    assert out[3].keys() == out[0].keys()
    for k, v in out[0].items():
        assert out[3][k] == pytest.approx(v, abs=1e-6), k


def test_at_fit_start_gives_the_baseline_once(base, shapes_dir):
    """at_fit_start evaluates before the first step (history at step 0), and not again for a resumed run."""

    def fit(ev):
        dm = ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar", val=None, shapes_dir=shapes_dir,
                             batch_size=2, num_workers=0, max_length=256)
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[ev]).fit(_dpo(base), dm)

    ev = Evaluate([PopeTask(limit=2, batch_size=2, max_new_tokens=2)], every_n_validations=0, at_fit_end=True,
                  at_fit_start=True, samples=0, plot=False)
    fit(ev)
    assert [step for step, _ in ev.history] == [0, 1]
    resumed = Evaluate([PopeTask(limit=2, batch_size=2, max_new_tokens=2)], every_n_validations=0,
                       at_fit_end=False, at_fit_start=True, samples=0, plot=False)
    resumed.load_state_dict(ev.state_dict())
    fit(resumed)
    assert [step for step, _ in resumed.history] == [0, 1]  # nothing added: the baseline exists
