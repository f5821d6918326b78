"""data_prep/seva_pairs.py and data_prep/sima_pairs.py on a real tiny model: what is kept, what is dropped and
why, and that what is written are valid preference records."""

import os
import sys

import pytest

from vlalign.backbone import Backbone, BackboneConfig
from vlalign.data.schema import PreferenceRecord, PromptRecord, parse_record
from vlalign.data.shards import ShardWriter, read_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_prep"))
import seva_pairs  # noqa: E402
import sima_pairs  # noqa: E402

FAST = ["--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("self") / "sft"
    Backbone(BackboneConfig()).build().export_merged(str(out))
    return str(out)


def _written(summary):
    return [s for p in summary["shards"] for s in read_shard(p)]


# ------------------------------------------------------------------------------------------------------ SIMA
@pytest.mark.parametrize("text, verdict", [
    ("The reason: ... The better AI generated response: [[1]].", 1),
    ("The better AI generated response: [[2]]", 2),
    ("[[ 2 ]]", 2),
    ("Response [[1]] adds a star. The better AI generated response: [[2]].", 2),  # the last marker decides
    ("The better AI generated response: 1", None),
    ("[[3]]", None),
    ("[[1 or 2]]", None),
    ("[[]]", None),
    ("[1]", None),
    ("", None),
])
def test_parse_verdict(text, verdict):
    assert sima_pairs.parse_verdict(text) == verdict


def test_pair_construction_follows_the_verdict():
    rec = PromptRecord("p1", [{"role": "user", "content": "<image>\nWhat is there?"}], "A red circle.",
                       meta={"scene": 3})
    one = sima_pairs.sima_pair(rec, "sampled answer", "greedy answer", 1, {"critic": "... [[1]]"})
    two = sima_pairs.sima_pair(rec, "sampled answer", "greedy answer", 2)
    assert (one.chosen, one.rejected) == ("sampled answer", "greedy answer")
    assert (two.chosen, two.rejected) == ("greedy answer", "sampled answer")
    assert one.prompt == rec.prompt and one.meta["verdict"] == 1 and one.meta["scene"] == 3
    assert isinstance(parse_record(one.to_json()), PreferenceRecord)
    assert sima_pairs.sima_pair(rec, "a", "b", None) is None


def test_critic_prompt_has_every_element():
    p = sima_pairs.critic_prompt("<image>\nWhat is\nthere?", "A red circle.", "first\nanswer", "second", examples=2)
    for part in ("Question: [What is there?]", "Ground truth: [A red circle.]", "AI generated response 1: [first answer]",
                 "AI generated response 2: [second]", "object description", "depicting relationships",
                 "describing attributes", "Example 2:", "The better AI generated response: [[1]]",
                 "The better AI generated response: [[2]]"):
        assert part in p
    assert "Example" not in sima_pairs.critic_prompt("q", "t", "a", "b", examples=0)


def test_sima_counts_unparsable_verdicts(model_dir, shapes_dir, tmp_path):
    summary = sima_pairs.main(["--model", model_dir, "--prompts", f"{shapes_dir}/prompts/train-000000.tar",
                               "--out", str(tmp_path / "sima-%06d.tar"), "--limit", "4", "--examples", "0",
                               "--critic-max-new-tokens", "4", *FAST])
    d = summary["dropped"]
    assert summary["read"] == 4 and summary["kept"] == 0 and summary["shards"] == []  # a random model never says [[k]]
    assert d.get("unparsable_verdict", 0) + d.get("identical", 0) + d.get("empty_response", 0) == 4
    assert summary["verdicts"].get("unparsable", 0) == d.get("unparsable_verdict", 0) > 0


def test_sima_writes_pairs_by_verdict_and_skips_records_without_truth(model_dir, shapes_dir, tmp_path, monkeypatch):
    src = [(r, ims) for r, ims in read_shard(f"{shapes_dir}/prompts/train-000000.tar")][:3]
    with ShardWriter(str(tmp_path / "in-%06d.tar")) as w:
        for r, ims in src:
            w.write(r, ims)
        w.write(PromptRecord("no-truth", src[0][0].prompt), src[0][1])
    monkeypatch.setattr(sima_pairs, "parse_verdict", lambda text: 1)  # as if the critic always preferred response 1
    summary = sima_pairs.main(["--model", model_dir, "--prompts", str(tmp_path / "in-*.tar"),
                               "--out", str(tmp_path / "sima-%06d.tar"), "--examples", "0",
                               "--critic-max-new-tokens", "2", *FAST])
    written = _written(summary)
    assert summary["dropped"]["no_answer"] == 1
    assert summary["kept"] == len(written) == 3 - summary["dropped"].get("identical", 0) > 0
    assert summary["verdicts"] == {"1": summary["kept"]} and summary["chosen_from"] == {"sample": summary["kept"]}
    by_id = {r.id: (r, ims) for r, ims in src}
    for pair, images in written:
        source, source_images = by_id[pair.id.removeprefix("sima-")]
        assert isinstance(pair, PreferenceRecord) and pair.prompt == source.prompt
        assert pair.meta["verdict"] == 1 and pair.meta["responses"] == {"1": "sample", "2": "greedy"}
        assert pair.chosen != pair.rejected
        assert [im.tobytes() for im in images] == [im.tobytes() for im in source_images]


# ------------------------------------------------------------------------------------------------------ SeVa
def test_same_answer_and_suffix_stripping():
    assert not seva_pairs.same_answer("A red circle.", "A red\ncircle.")  # newlines are deleted, not spaces
    assert seva_pairs.same_answer("A red circle.</s>\n", "\nA red circle.")
    rec = PromptRecord("q", [{"role": "user", "content": "<image>\nWho wrote it?\nAnswer the question using a "
                                                          "single word or phrase."}])
    assert seva_pairs.strip_suffix(rec, seva_pairs.OCRVQA_SUFFIX).prompt[0]["content"] == "<image>\nWho wrote it?"
    assert seva_pairs.strip_suffix(rec, "") is rec


def _seva(model_dir, prompts, out, *extra):
    return seva_pairs.main(["--model", model_dir, "--prompts", prompts, "--out", str(out), *FAST, *extra])


def test_seva_drops_identical_answers(model_dir, shapes_dir, tmp_path):
    # at diffusion step 0 the noise std is 0.003: the greedy answers on both images agree
    summary = _seva(model_dir, f"{shapes_dir}/prompts/train-000000.tar", tmp_path / "s-%06d.tar", "--limit", "4",
                    "--augment", "diffusion", "--t", "0")
    assert summary["kept"] == 0 and summary["dropped"] == {"identical": 4} and summary["read"] == 4
    assert summary["shards"] == [] and summary["t"] == 0


def test_seva_writes_valid_deterministic_pairs(model_dir, shapes_dir, tmp_path):
    src = [(r, ims) for r, ims in read_shard(f"{shapes_dir}/prompts/train-000000.tar")][:4]
    with ShardWriter(str(tmp_path / "in-%06d.tar")) as w:
        for r, ims in src[:3]:
            w.write(r, ims)
        r, ims = src[3]  # an OCR-VQA style prompt: the suffix is removed before generation and in the pair
        w.write(PromptRecord("ocr", [{"role": "user", "content": r.prompt[0]["content"] + " " +
                                      seva_pairs.OCRVQA_SUFFIX}], r.answer), ims)
    runs = [_seva(model_dir, str(tmp_path / "in-*.tar"), tmp_path / f"{b}-%06d.tar", "--augment", "diffusion",
                  "--t", "999", "--batch-size", b) for b in ("2", "4")]
    written = [[(p.to_json(), [im.tobytes() for im in ims]) for p, ims in _written(s)] for s in runs]
    assert written[0] == written[1]  # the seed decides, not the batching
    summary = runs[0]
    assert summary["kept"] + summary["dropped"].get("identical", 0) == 4 and summary["kept"] > 0
    by_id = {r.id: (r, ims) for r, ims in src}
    for pair, images in _written(summary):
        assert isinstance(pair, PreferenceRecord) and not seva_pairs.same_answer(pair.chosen, pair.rejected)
        assert pair.meta["method"] == "seva" and pair.meta["augmentation"] == "diffusion" and pair.meta["t"] == 999
        assert seva_pairs.OCRVQA_SUFFIX not in pair.prompt[-1]["content"]
        source = by_id.get(pair.id.removeprefix("seva-"), src[3])
        assert [im.tobytes() for im in images] == [im.tobytes() for im in source[1]]  # the clean image is stored


def test_seva_pil_augmentation(model_dir, shapes_dir, tmp_path):
    summary = _seva(model_dir, f"{shapes_dir}/prompts/train-000000.tar", tmp_path / "m-%06d.tar", "--limit", "3",
                    "--augment", "moco")
    assert summary["augmentation"] == "moco" and "t" not in summary
    assert summary["kept"] + summary["dropped"].get("identical", 0) == 3
    assert all(p.meta["augmentation"] == "moco" for p, _ in _written(summary))
