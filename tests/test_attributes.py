"""data_prep/attributes.py: mllm-dpo's pair rule, rejection sampling and SteerLM prompts on hand-worked groups, and
the shard CLI end to end."""

import io
import os
import random
import sys
import tarfile

import pytest
from PIL import Image

from vlalign.data.schema import PreferenceRecord, SFTRecord
from vlalign.data.shards import ShardWriter, read_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_prep"))
import attributes  # noqa: E402


def grades(h, c, coh, cx=2, v=2):
    return {"helpfulness": h, "correctness": c, "coherence": coh, "complexity": cx, "verbosity": v}


# totals (helpfulness + correctness + coherence): 12, 9, 4
WIDE = [grades(4, 4, 4), grades(3, 2, 4), grades(1, 0, 3)]
# totals 10, 9, 9: spread 1
NARROW = [grades(4, 3, 3), grades(3, 3, 3), grades(4, 2, 3)]
# totals 7, 9, 9, 5: the first 9 is chosen; 7 and 5 are <= 9 - 2
TIED = [grades(2, 2, 3), grades(3, 3, 3), grades(4, 2, 3), grades(1, 1, 3)]


def test_overall_score_sums_three_attributes():
    assert [attributes.overall_score(s) for s in WIDE] == [12, 9, 4]
    assert attributes.overall_score(grades(1, 2, 3, cx=4, v=4)) == 6  # complexity, verbosity do not count


def test_pair_rule_by_hand():
    texts = ["a", "b", "c", "d"]
    assert attributes.dpo_pair(texts[:3], NARROW, random.Random(0)) is None
    assert attributes.dpo_pair(["x", "y"], [grades(3, 3, 2), grades(2, 2, 2)], random.Random(0)) == ("x", "y")
    assert attributes.dpo_pair(["x", "y"], [grades(3, 3, 2), grades(3, 2, 2)], random.Random(0)) is None
    seen = {attributes.dpo_pair(texts[:3], WIDE, random.Random(s)) for s in range(50)}
    assert seen == {("a", "b"), ("a", "c")}  # 9 <= 12 - 2 and 4 <= 12 - 2, both drawn
    seen = {attributes.dpo_pair(texts, TIED, random.Random(s)) for s in range(50)}
    assert seen == {("b", "a"), ("b", "d")}  # never the other 9, never the chosen one


def test_rejected_is_always_at_least_two_below_the_best():
    rng = random.Random(123)
    for _ in range(300):
        scores = [grades(rng.randint(0, 4), rng.randint(0, 4), rng.randint(0, 4)) for _ in range(rng.randint(2, 5))]
        totals = [attributes.overall_score(s) for s in scores]
        pair = attributes.pair_indices(scores, random.Random(rng.random()))
        if max(totals) - min(totals) < 2:
            assert pair is None
        else:
            assert totals[pair[0]] == max(totals) and pair[0] == totals.index(max(totals))
            assert totals[pair[1]] <= max(totals) - 2


def test_pair_rule_is_deterministic_under_seed():
    texts = ["a", "b", "c", "d"]
    draws = [attributes.dpo_pair(texts, TIED, random.Random(7)) for _ in range(5)]
    assert len(set(draws)) == 1


def test_rejection_sampling_takes_the_best():
    assert attributes.rejection_sampling_sft(["a", "b", "c"], WIDE) == "a"
    assert attributes.rejection_sampling_sft(["a", "b", "c", "d"], TIED) == "b"
    assert attributes.rejection_sampling_sft(["a", "b", "c"], NARROW) == "a"  # no spread needed


def test_steerlm_prompt():
    assert attributes.steerlm_prompt("<image>\nWhat is this?", attributes.STEERLM_INFERENCE_TARGETS) == (
        "<image>\nWhat is this?\nAnswer in the following attributes in 5-point Likert scale: "
        "Helpfulness: 4, Correctness: 4, Coherence: 4, Complexity: 4, Verbosity: 4")
    assert attributes.STEERLM_INFERENCE_TARGETS == {a: 4 for a in attributes.ATTRIBUTES}
    assert attributes.steerlm_prompt("Q", grades(0, 1, 2, 3, 4.0)).endswith(
        "Helpfulness: 0, Correctness: 1, Coherence: 2, Complexity: 3, Verbosity: 4")


@pytest.mark.parametrize("bad", [5, -1, 2.5, "4", None, True, float("nan"), float("inf")])
def test_bad_grades_are_refused(bad):
    with pytest.raises(ValueError, match="helpfulness"):
        attributes.overall_score(grades(bad, 1, 1))
    with pytest.raises(ValueError, match="helpfulness"):
        attributes.steerlm_prompt("Q", grades(bad, 1, 1))
    with pytest.raises(ValueError, match="verbosity"):
        attributes.steerlm_prompt("Q", {k: v for k, v in grades(1, 1, 1).items() if k != "verbosity"})


# --------------------------------------------------------------------------------------------------------- CLI
def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _group(rid, scores):
    cands = [f"{rid} answer {k}" for k in range(len(scores))]
    return PreferenceRecord(rid, [{"role": "user", "content": "<image>\nDescribe it."}], cands[0], cands[-1],
                            candidates=cands, scores=scores, meta={"source": "test"})


@pytest.fixture
def graded_shards(tmp_path):
    ref = {"model": "ref", "candidates": [{"sum": -1.0 * k, "mean": -0.5 * k, "tokens": 2} for k in range(3)]}
    with ShardWriter(str(tmp_path / "in" / "g-%06d.tar"), max_count=3) as w:
        w.write({**_group("wide", WIDE).to_json(), "ref_logps": ref}, [_png("red")])
        w.write(_group("narrow", NARROW), [_png("blue")])
        w.write(_group("tied", TIED), [_png("green")])
        w.write(PreferenceRecord("plain", [{"role": "user", "content": "Hi"}], "a", "b"))
        w.write({"kind": "sft", "id": "s", "conversation": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]})
        w.write(_group("broken", [grades(4, 4, 4), grades(0, 0, 0, v=9)]))
        w.image_format = "jpg"
        w.write(_group("jpeg", WIDE), [_jpg("white")])
    return tmp_path


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_cli_writes_three_sets(graded_shards, capsys):
    out = graded_shards / "out"
    summary = attributes.main(["--in", str(graded_shards / "in"), "--out", str(out), "--seed", "3", "--no-progress"])
    assert summary["records_read"] == 7 and summary["groups_read"] == 5
    assert summary["pairs"] == 3  # wide, tied, jpeg
    assert summary["skipped"] == {"spread_below_2": 1, "no_scores": 1, "not_preference": 1, "bad_scores": 1}
    assert summary["rejection_sampling"] == 4 and summary["steerlm"] == 3 + 3 + 4 + 3
    assert "verbosity" in capsys.readouterr().err  # the bad record is named

    def records(kind):
        return {r.id: (r, ims) for p in summary["shards"][kind] for r, ims in read_shard(p)}

    dpo = records("dpo")
    assert sorted(dpo) == ["jpeg", "tied", "wide"]
    wide = dpo["wide"][0]
    assert wide.chosen == "wide answer 0" and wide.rejected in {"wide answer 1", "wide answer 2"}
    assert wide.candidates is None and wide.meta["chosen_score"] == 12
    k = wide.meta["rejected_index"]
    assert wide.ref_logps["chosen"].sum == 0.0 and wide.ref_logps["rejected"].sum == -1.0 * k
    assert dpo["tied"][0].chosen == "tied answer 1"
    assert dpo["tied"][0].rejected in {"tied answer 0", "tied answer 3"}

    rs = records("rejection_sampling")
    assert {i: r.conversation[-1]["content"] for i, (r, _) in rs.items()} == {
        "wide": "wide answer 0", "narrow": "narrow answer 0", "tied": "tied answer 1", "jpeg": "jpeg answer 0"}
    assert all(isinstance(r, SFTRecord) for r, _ in rs.values())

    steer = records("steerlm")
    r, _ = steer["tied-c3"]
    assert r.conversation[0]["content"] == attributes.steerlm_prompt("<image>\nDescribe it.", TIED[3])
    assert r.conversation[1]["content"] == "tied answer 3"

    # images are carried byte for byte, under their own extension
    for kind in ("dpo", "rejection_sampling", "steerlm"):
        members = {}
        for p in summary["shards"][kind]:
            members.update(_members(p))
        images = {name.split(".", 1)[1]: data for name, data in members.items() if not name.endswith(".json")}
        assert set(images) == {"png", "jpg"}
    got = {m for p in summary["shards"]["dpo"] for m in _members(p).values()}
    assert _png("red") in got and _jpg("white") in got


def test_cli_is_deterministic_and_seeded(graded_shards):
    def run(seed, name):
        s = attributes.main(["--in", str(graded_shards / "in" / "g-*.tar"), "--out", str(graded_shards / name),
                             "--seed", str(seed), "--no-progress"])
        return [(r.id, r.rejected) for p in s["shards"]["dpo"] for r, _ in read_shard(p)]

    first = run(0, "a")
    assert run(0, "b") == first
    assert any(run(seed, f"s{seed}") != first for seed in range(1, 8))


def test_cli_counts_a_bad_sample_and_a_truncated_shard(graded_shards, capsys):
    """An undecodable image and a shard cut off inside its last sample are counted (``bad_sample:<reason>``), not
    fatal, and every good group around them is still used."""
    bad = graded_shards / "bad"
    with ShardWriter(str(bad / "g-%06d.tar"), max_count=3) as w:
        w.write(_group("first", WIDE), [_png("red")])
        w.write(_group("broken_image", WIDE), [b"not an image"])
        w.write(_group("second", TIED), [_png("blue")])
        w.write(_group("third", WIDE), [_png("green")])
        w.write(_group("cut", WIDE), [_png("white")])
    with tarfile.open(w.paths[1]) as tar:
        cut = tar.getmember(f"{w.total - 1:09d}.png").offset_data + 10  # inside the last sample's image
    with open(w.paths[1], "r+b") as f:
        f.truncate(cut)
    summary = attributes.main(["--in", str(bad), "--out", str(graded_shards / "out_bad"), "--no-progress"])
    assert summary["records_read"] == 5 and summary["groups_read"] == 3 and summary["pairs"] == 3
    assert summary["skipped"] == {"bad_sample:bad_image": 1, "bad_sample:shard_truncated": 1}
    rs = [r.id for p in summary["shards"]["rejection_sampling"] for r, _ in read_shard(p)]
    assert rs == ["first", "second", "third"]
    err = capsys.readouterr().err
    assert f"shard {w.paths[0]} key 000000001" in err and f"shard {w.paths[1]} key 000000004" in err
