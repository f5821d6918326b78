"""CUDA checks (marker ``gpu``; skipped where no GPU is present, so CI skips them): bf16 numerics of the packed
layout, the attention implementations, generation with the KV cache, SeVa / SIMA pair generation, PPO rollouts,
and training under ``bf16-mixed`` and ``bf16-true``.

``eval/gpu_check.py`` runs this file first on a GPU machine; when ``GPU_CHECK_OUT`` names a directory the measured
figures are also written there (``gpu_tests.jsonl``) for its results table.

Why the bf16 tolerance is what it is: bf16 keeps 8 significant bits, so every stored activation carries a relative
rounding error up to 2^-9 (about 2e-3). A response's log-prob sums ~10-200 token log-probs, each the result of a
forward through every layer in bf16, so both layouts land within ~1e-2 relative of the float32 value, and they
differ from each other by about as much as each differs from float32 (other kernels, other padding, other reduction
orders: the same math, rounded differently). The test therefore measures the bf16-vs-float32 error of the plain
layout and requires the packed-vs-plain gap to stay within twice that (plus 1e-2 absolute), not a fixed constant that
would be either too loose for short responses or too tight for long ones.
"""

import json
import os
import sys

import lightning as L
import pytest
import torch

from vlalign.backbone import Backbone, BackboneConfig, LoraSpec, TinySpec
from vlalign.data.collate import PairExample, collate_pairs
from vlalign.data.module import ShardDataModule
from vlalign.logps import pair_logps
from vlalign.optim import OptimConfig

pytestmark = pytest.mark.gpu
# ``VLALIGN_GPU_TESTS_ON_CPU=1`` runs these on the CPU (a dry run of the file before spending GPU time on it)
ON_CPU = os.environ.get("VLALIGN_GPU_TESTS_ON_CPU") == "1"
CUDA = torch.device("cpu" if ON_CPU else "cuda")
ACCELERATOR = "cpu" if ON_CPU else "gpu"
HERE = os.path.dirname(os.path.abspath(__file__))


def record(name: str, **figures):
    """Print a figure and append it to ``$GPU_CHECK_OUT/gpu_tests.jsonl`` for the GPU check's table."""
    print(f"{name}: {figures}")
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_tests.jsonl"), "a") as f:
            f.write(json.dumps({"check": name, **figures}) + "\n")


def _examples(bb, n=6, seed=0, long=False):
    """Random pairs of different prompt and response lengths (image tokens included)."""
    g = torch.Generator().manual_seed(seed)
    img, k = bb.image_token_id, bb.num_image_tokens
    size = bb.config.tiny.image_size
    out = []
    for i in range(n):
        p = int(torch.randint(3, 12, (1,), generator=g))
        lens = torch.randint(20 if long else 2, 120 if long else 12, (2,), generator=g).tolist()
        prompt = [bb.tokenizer.bos_token_id] + [img] * k + torch.randint(10, 300, (p,), generator=g).tolist()
        responses = [torch.randint(10, 300, (l,), generator=g).tolist() for l in lens]
        out.append(PairExample(prompt, responses, torch.randn(1, 3, size, size, generator=g), None, f"ex{i}"))
    return out


def _logps(bb, examples, layout, dtype):
    batch = collate_pairs(examples, bb.tokenizer.pad_token_id, layout=layout)
    batch = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with torch.no_grad():
        return pair_logps(bb, batch).sum.float().reshape(-1)


@pytest.fixture(scope="module")
def tiny32():
    """A wider-than-default tiny LLaVA on the GPU in float32 (the oracle)."""
    spec = TinySpec(text_hidden=512, text_layers=6, text_heads=8, text_kv_heads=8, text_intermediate=1024)
    bb = Backbone(BackboneConfig(tiny=spec)).build()
    return bb.to(CUDA).eval()


def _cast(bb32, dtype, attn=None):
    bb = Backbone(BackboneConfig(tiny=bb32.config.tiny, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                                 attn_implementation=attn or bb32.config.attn_implementation)).build()
    bb.model.load_state_dict({k: v.to(dtype) for k, v in bb32.model.state_dict().items()})
    return bb.to(CUDA).eval()


def test_bf16_packed_matches_plain_within_bf16_error(tiny32):
    bb16 = _cast(tiny32, torch.bfloat16)
    examples = _examples(tiny32, long=True)
    ref = _logps(tiny32, examples, "plain", torch.float32)
    ref_packed = _logps(tiny32, examples, "packed", torch.float32)
    plain, packed = _logps(bb16, examples, "plain", torch.bfloat16), _logps(bb16, examples, "packed", torch.bfloat16)
    fp32_gap = float((ref_packed - ref).abs().max() / ref.abs().max())
    bf16_err = float((plain - ref).abs().max())
    layout_gap = float((packed - plain).abs().max())
    record("bf16_packed_vs_plain", fp32_layout_rel_gap=fp32_gap, bf16_vs_fp32_abs=bf16_err,
           bf16_layout_abs_gap=layout_gap, mean_abs_logp=float(ref.abs().mean()),
           bf16_vs_fp32_rel=bf16_err / float(ref.abs().mean()))
    assert fp32_gap < 1e-5
    assert layout_gap <= 2 * bf16_err + 1e-2
    assert bf16_err / float(ref.abs().mean()) < 2e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_implementations_agree_on_cuda(tiny32, attn):
    """Packed sequences need a 4D mask: SDPA (the default) and eager must both honour it on CUDA."""
    bb = _cast(tiny32, torch.float32, attn=attn)
    examples = _examples(tiny32, seed=1)
    ref = _logps(tiny32, examples, "plain", torch.float32)
    got = {layout: _logps(bb, examples, layout, torch.float32) for layout in ("plain", "packed")}
    gap = max(float((g - ref).abs().max() / ref.abs().max()) for g in got.values())
    record("attention_" + attn, rel_gap_vs_sdpa_plain=gap)
    assert gap < 1e-4


def test_generation_with_kv_cache_equals_without(tiny32):
    bb = tiny32
    examples = _examples(bb, n=3, seed=2)
    pad = bb.tokenizer.pad_token_id
    width = max(len(e.prompt) for e in examples)
    ids = torch.tensor([[pad] * (width - len(e.prompt)) + e.prompt for e in examples], device=CUDA)
    mask = (ids != pad).long()
    pv = torch.cat([e.pixel_values for e in examples]).to(CUDA)
    cached = bb.generate(ids, mask, pv, max_new_tokens=16)
    m = bb.model
    plain = m.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=16, do_sample=False,
                       use_cache=False, pad_token_id=pad, eos_token_id=bb.tokenizer.eos_token_id,
                       suppress_tokens=[bb.image_token_id], temperature=None, top_p=None, top_k=None)[:, width:]
    n = min(cached.shape[1], plain.shape[1])
    record("kv_cache_generation", tokens=int(cached.numel()), equal=bool(torch.equal(cached[:, :n], plain[:, :n])))
    assert torch.equal(cached[:, :n], plain[:, :n])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_gen") / "export"
    Backbone(BackboneConfig()).build().export_merged(str(out / "merged"))
    return str(out)


def test_seva_and_sima_pairs_generate_on_cuda(model_dir, shapes_dir, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "data_prep"))
    import seva_pairs
    import sima_pairs

    prompts = f"{shapes_dir}/prompts/train-000000.tar"
    seva = seva_pairs.main(["--model", model_dir, "--prompts", prompts, "--out", str(tmp_path / "seva-%06d.tar"),
                            "--limit", "16", "--max-new-tokens", "12", "--batch-size", "8", "--t", "999",
                            "--device", CUDA.type, "--no-progress"])
    sima = sima_pairs.main(["--model", model_dir, "--prompts", prompts, "--out", str(tmp_path / "sima-%06d.tar"),
                            "--limit", "8", "--max-new-tokens", "12", "--critic-max-new-tokens", "12", "--batch-size", "8",
                            "--device", CUDA.type,
                            "--no-progress"])
    record("seva_sima_cuda", seva_read=seva["read"], seva_kept=seva["kept"], sima_read=sima["read"])
    assert seva["read"] == 16 and sima["read"] == 8


def _frozen_and_trainable(module):
    return ({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
            {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad})


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_dpo_trains_under_bf16(make_backbone, shapes_dir, tmp_path, precision):
    from vlalign.dpo import DPOModule

    base = str(tmp_path / "base")
    make_backbone().export_merged(base)
    module = DPOModule(BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                                      train_projector=False), OptimConfig(lr=1e-2, schedule="constant"))
    dm = ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar", val=None, batch_size=4, num_workers=0)
    losses = []

    class Grab(L.Callback):
        def on_fit_start(self, trainer, m):
            self.before = _frozen_and_trainable(m)

        def on_train_batch_end(self, trainer, m, outputs, batch, idx):
            losses.append(float(outputs["loss"]))

    grab = Grab()
    L.Trainer(max_steps=4, accelerator=ACCELERATOR, devices=1, precision=precision, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[grab]).fit(module, dm)
    trainable, frozen = _frozen_and_trainable(module)
    record("dpo_" + precision, losses=losses)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v.cpu(), grab.before[0][n].cpu()) for n, v in trainable.items())
    assert all(torch.equal(v.cpu(), grab.before[1][n].cpu()) for n, v in frozen.items())


def test_ppo_rollouts_train_on_cuda(reward_export, shapes_dir):
    from vlalign.generation import Sampling
    from vlalign.ppo import PPOConfig, PPOModule

    base, reward = reward_export
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    module = PPOModule(BackboneConfig(checkpoint=base, lora=lora, train_projector=False), reward,
                       OptimConfig(lr=1e-3, head_lr=1e-3), PPOConfig(epochs=1, minibatch_size=4),
                       Sampling(max_new_tokens=12, do_sample=True), critic_lora=lora, sample_every=0)
    dm = ShardDataModule(train=f"{shapes_dir}/prompts/train-*.tar", val=None, batch_size=8, num_workers=0)
    rewards = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, m, outputs, batch, idx):
            rewards.append(float(trainer.callback_metrics["train/reward_mean"]))

    L.Trainer(max_steps=3, accelerator=ACCELERATOR, devices=1, precision="bf16-mixed", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[Grab()]).fit(module, dm)
    record("ppo_cuda_bf16_mixed", reward_mean=rewards)
    assert rewards and all(torch.isfinite(torch.tensor(rewards)))
