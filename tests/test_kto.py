"""KTOModule and the ``unpaired`` data path on the tiny model and real shards."""

import io
import json
import math
import lightning as L
import pytest
import torch
from PIL import Image
from raw_tar import write_tar

from vlalign.backbone import BackboneConfig, LoraSpec
from vlalign.data.module import ShardDataModule
from vlalign.data.schema import RecordError, UnpairedRecord, parse_record
from vlalign.kto import KTOModule
from vlalign.optim import OptimConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_backbone):
    out = tmp_path_factory.mktemp("kto") / "base"
    make_backbone().export_merged(str(out))
    return str(out)


def _module(base, **kw):
    cfg = BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_vision=False,
                         train_projector=False)
    m = KTOModule(cfg, OptimConfig(lr=1e-2, schedule="constant"), **kw)
    m.configure_model()
    return m


def _data(shards, batch_size=4):
    return ShardDataModule(train=shards, val=None, batch_size=batch_size, num_workers=0, shuffle_buffer=0)


def _batch(module, shards, layout="packed", n=4):
    dm = _data(shards, n)
    dm.attach(module.backbone, {"format": "unpaired", "layout": layout})
    return next(iter(dm.train_dataloader()))


def test_unpaired_records_parse():
    rec = parse_record({"kind": "unpaired", "id": 7, "prompt": "<image>\nWhat is there?", "completion": "A star.",
                        "label": False})
    assert isinstance(rec, UnpairedRecord) and rec.label is False and rec.id == "7"
    assert parse_record(rec.to_json()) == rec
    with pytest.raises(RecordError, match="label"):
        parse_record({"kind": "unpaired", "id": 1, "prompt": "Q", "completion": "A", "label": "yes"})


def test_a_batch_pairs_each_prompt_with_the_previous_response(base, shapes_dir):
    """Preference records give a desirable and an undesirable example; response 1 of each row is the completion
    of the row before it (KTO's mismatched pair for the KL estimate)."""
    m = _module(base)
    batch = _batch(m, f"{shapes_dir}/preference/train-*.tar", layout="plain", n=4)
    assert batch["desirable"].tolist() == [True, False, True, False]  # shuffling off: chosen, rejected, ...
    targets = batch["targets"].view(4, 2, -1)
    for i in range(4):
        own_prev = targets[(i - 1) % 4, 0]
        n = int((own_prev != -100).sum())
        assert torch.equal(targets[i, 1, :n], own_prev[:n])


def test_loss_is_half_when_policy_equals_reference(base, shapes_dir):
    m = _module(base)  # LoRA B = 0: policy == reference, so r = 0 and z0 = 0: 1 - sigmoid(0) per example
    m.eval()
    with torch.no_grad():
        loss, metrics = m.step(_batch(m, f"{shapes_dir}/preference/train-*.tar"))
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_packed_and_plain_give_the_same_loss(base, shapes_dir):
    m = _module(base)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    m.eval()
    shards = f"{shapes_dir}/preference/train-*.tar"
    with torch.no_grad():
        packed, mp = m.step(_batch(m, shards, "packed"))
        plain, mq = m.step(_batch(m, shards, "plain"))
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mp["kl"], mq["kl"], rtol=1e-5, atol=1e-6)
    assert packed.item() != pytest.approx(0.5, abs=1e-4)


def _unpaired_shard(path, n=8):
    """A shard of records of kind "unpaired" (what a converted KTO dataset holds)."""
    img = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(img, format="PNG")
    members = []
    for i in range(n):
        rec = {"kind": "unpaired", "id": f"u{i}", "prompt": "<image>\nWhat colour is the shape?",
               "completion": "Red." if i % 3 else "Blue.", "label": i % 3 != 0}
        members += [(f"u{i:04d}.json", json.dumps(rec).encode()), (f"u{i:04d}.png", img.getvalue())]
    write_tar(path, members)


def test_trainable_change_and_frozen_stay_bit_identical(base, tmp_path):
    shard = str(tmp_path / "unpaired-000000.tar")
    _unpaired_shard(shard)
    torch.manual_seed(0)
    m = _module(base)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(m, _data(shard))
    for n, p in m.named_parameters():
        if n in trainable:
            if "lora_A" not in n:  # A gets no gradient while B is still zero at the first step
                assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    metrics = m.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and 0 <= float(metrics["train/desirable_fraction"]) <= 1


def test_bad_configuration_is_refused(base):
    with pytest.raises(ValueError, match="live reference"):
        KTOModule(BackboneConfig(checkpoint=base, lora=LoraSpec(r=2)), reference="precomputed")
    with pytest.raises(ValueError, match="adapter"):
        KTOModule(BackboneConfig(checkpoint=base), reference="adapter")
