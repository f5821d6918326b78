"""data_prep/precompute_ref.py: stored reference log-probs equal a fresh reference's, the DPO pipeline accepts
them (token counts match), images are copied byte for byte, unscorable records are counted."""

import json
import os
import sys
import tarfile
from dataclasses import replace

import pytest
import torch

from vlalign.backbone import Backbone, BackboneConfig
from vlalign.data.chat import Encoder
from vlalign.data.collate import collate_pairs
from vlalign.data.pipeline import Encode
from vlalign.data.shards import read_shard
from vlalign.generation import load_model
from vlalign.logps import pair_logps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_prep"))
import precompute_ref  # noqa: E402

N = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "sft"
    Backbone(BackboneConfig()).build().export_merged(str(out))
    return str(out)


@pytest.fixture(scope="module")
def scored(model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_out")
    summary = precompute_ref.main(["--model", model_dir, "--in", f"{shapes_dir}/preference/train-000000.tar",
                                   "--out", str(out / "ref-%06d.tar"), "--limit", str(N), "--batch-size", "4",
                                   "--device", "cpu", "--no-progress"])
    return summary, [s for p in summary["shards"] for s in read_shard(p)]


def _encode(bb, k=2, max_length=512):
    enc = Encoder(bb.tokenizer, bb.processor.chat_template, bb.num_image_tokens)
    return Encode(enc, bb.processor.image_processor, "pairs", max_length, num_responses=k)


def test_stored_logps_equal_a_fresh_reference(model_dir, scored):
    summary, samples = scored
    assert summary["scored"] == N and len(samples) == N and not summary["unscored"]
    ref = Backbone(BackboneConfig(checkpoint=model_dir, train_language=False, train_projector=False)).build().eval()
    encode = _encode(ref)
    bare = [(replace(r, ref_logps=None), ims) for r, ims in samples]
    with torch.no_grad():
        out = pair_logps(ref, collate_pairs([encode(r, ims) for r, ims in bare], ref.tokenizer.pad_token_id,
                                            layout="plain"))
    for b, (record, _) in enumerate(samples):
        assert record.ref_logps["model"] == summary["model"]
        for i, side in enumerate(("chosen", "rejected")):
            lp = record.ref_logps[side]
            assert lp.sum == pytest.approx(out.sum[b, i].item(), rel=1e-5)
            assert lp.mean == pytest.approx(out.mean[b, i].item(), rel=1e-5)
            assert lp.tokens == out.tokens[b, i].item()


def test_dpo_pipeline_accepts_them(scored, model_dir):
    _, samples = scored
    bb = load_model(model_dir, device="cpu")
    pairs, ranked = _encode(bb), _encode(bb, k=3)
    for record, images in samples:
        ex = pairs(record, images)
        assert [r["tokens"] for r in ex.ref_logps] == [len(x) for x in ex.responses]  # the pipeline's own check
        if record.candidates and len(record.candidates) == 3:
            assert len(record.ref_logps["candidates"]) == 3
            ex = ranked(record, images)
            assert ex.ref_logps is not None and ex.ref_logps[0]["sum"] == record.ref_logps["candidates"][0].sum
    batch = collate_pairs([pairs(r, ims) for r, ims in samples], bb.tokenizer.pad_token_id)
    assert batch["ref_logps_sum"].shape == (N, 2)


def test_images_are_copied_byte_for_byte(scored, shapes_dir):
    summary, _ = scored

    def pngs(path):
        with tarfile.open(path) as tar:
            return [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]

    assert pngs(summary["shards"][0]) == pngs(f"{shapes_dir}/preference/train-000000.tar")[:N]


def test_unscorable_records_are_counted_and_optionally_kept(model_dir, shapes_dir, tmp_path):
    args = ["--model", model_dir, "--in", f"{shapes_dir}/preference/train-000000.tar", "--limit", "4",
            "--max-length", "40", "--device", "cpu", "--no-progress"]  # the 36 image tokens alone nearly fill it
    dropped = precompute_ref.main(args + ["--out", str(tmp_path / "a-%06d.tar")])
    assert dropped["scored"] == 0 and dropped["unscored"] == {"too_long": 4} and dropped["shards"] == []
    kept = precompute_ref.main(args + ["--out", str(tmp_path / "b-%06d.tar"), "--keep-unscored"])
    records = [r for p in kept["shards"] for r, _ in read_shard(p)]
    assert kept["written_unscored"] == 4 and len(records) == 4
    assert all(r.ref_logps is None for r in records)
    # SFT records are not preference pairs
    other = precompute_ref.main(["--model", model_dir, "--in", f"{shapes_dir}/sft/train-000000.tar", "--limit", "2",
                                 "--out", str(tmp_path / "c-%06d.tar"), "--device", "cpu", "--no-progress"])
    assert other["unscored"] == {"wrong_kind": 2}


def test_dpo_trains_on_them_with_loss_log2_at_the_start(scored, model_dir):
    """Policy = the reference at step 0 (LoRA B = 0): every log-ratio is 0 and sigmoid DPO gives log 2."""
    import math

    from vlalign.backbone import LoraSpec
    from vlalign.data.module import ShardDataModule
    from vlalign.dpo import DPOModule

    summary, _ = scored
    module = DPOModule(BackboneConfig(checkpoint=model_dir, train_projector=False, lora=LoraSpec(r=4)),
                       reference="precomputed")
    module.configure_model()
    module.eval()
    dm = ShardDataModule(train=summary["shards"], val=None, batch_size=N, num_workers=0, shuffle_buffer=0)
    dm.attach(module.backbone, module.batch_spec())
    batch = next(iter(dm.stream("train", shuffle=False, batch_size=N)))
    assert not batch["skipped"] and batch["ref_logps_sum"].shape == (N, 2)
    with torch.no_grad():
        loss, metrics = module.step(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["rewards/margins"].abs().item() < 1e-3


def test_a_bad_sample_and_a_truncated_shard_are_counted_not_fatal(model_dir, shapes_dir, tmp_path):
    """Shards read as training reads them: an undecodable image and a shard cut off inside its last sample are
    counted under their reasons; every good record around them is still scored."""
    from vlalign.data.shards import ShardWriter, image_members, iter_shard

    raws = [r for _, r in zip(range(6), iter_shard(f"{shapes_dir}/preference/train-000000.tar"))]
    with ShardWriter(str(tmp_path / "in" / "p-%06d.tar"), max_count=3) as w:
        for i, raw in enumerate(raws):
            w.write(json.loads(raw["json"]), [b"not an image" if i == 1 else image_members(raw)[0][1]])
    with tarfile.open(w.paths[1]) as tar:
        cut = tar.getmember(f"{w.total - 1:09d}.png").offset_data + 10  # inside the last sample's image
    with open(w.paths[1], "r+b") as f:
        f.truncate(cut)
    summary = precompute_ref.main(["--model", model_dir, "--in", str(tmp_path / "in"), "--out",
                                   str(tmp_path / "out" / "ref-%06d.tar"), "--batch-size", "2", "--device", "cpu",
                                   "--no-progress"])
    assert summary["unscored"] == {"bad_image": 1, "shard_truncated": 1}
    ids = [json.loads(raw["json"])["id"] for raw in raws]
    got = [r for p in summary["shards"] for r, _ in read_shard(p)]
    assert [r.id for r in got] == [ids[i] for i in (0, 2, 3, 4)] and summary["scored"] == 4
    assert all(r.ref_logps is not None for r in got)
