"""data_prep/convert.py: every source format round-trips into shards (texts, images, candidates, log-probs), and bad
records either stop the run with file:line or are skipped and counted."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlalign.data.schema import PreferenceRecord, SFTRecord, UnpairedRecord
from vlalign.data.shards import read_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data_prep"))
import convert  # noqa: E402


@pytest.fixture
def images(tmp_path):
    """Small images under tmp_path/img: a.png, b.png, sub/d.png (random pixels), c.jpg, broken.png (not an image)."""
    root = tmp_path / "img"
    (root / "sub").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, size in (("a.png", (8, 6)), ("b.png", (5, 7)), ("sub/d.png", (6, 6)), ("c.jpg", (9, 9))):
        Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"not an image")
    return root


def _write(path, records, lines=False):
    """A JSON array with one item per line (item i on line i + 2), or JSON lines (record i on line i + 1)."""
    items = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(items) + "\n" if lines else "[\n" + ",\n".join(items) + "\n]\n")
    return path


def _run(fmt, src, images, out, *extra):
    argv = [fmt, "--in", str(src), "--image-root", str(images), "--out", str(out / "s-%03d.tar"), "--no-progress",
            "--shard-size", "2", *extra]
    return convert.main(argv)


def _read(summary):
    return [s for p in summary["shards"] for s in read_shard(p)]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _same_images(got, paths):
    return len(got) == len(paths) and all(np.array_equal(np.asarray(g), _pixels(p)) for g, p in zip(got, paths))


# ------------------------------------------------------------------------------------------------ round trips
def test_llava_sft(tmp_path, images):
    src = _write(tmp_path / "llava.json", [
        {"id": "l1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                         {"from": "gpt", "value": "Noise."}]},
        {"id": 2, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                    {"from": "human", "value": "More?"}, {"from": "gpt", "value": "Sure."}]},
        {"id": "l3", "image": ["b.png", "sub/d.png"],
         "conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Two."}]},
    ])
    summary = _run("llava-sft", src, images, tmp_path)
    assert (summary["read"], summary["written"], summary["skipped"]) == (3, 3, {})
    assert len(summary["shards"]) == 2  # --shard-size 2
    got = _read(summary)
    assert [r.id for r, _ in got] == ["l1", "2", "l3"] and all(isinstance(r, SFTRecord) for r, _ in got)
    assert got[0][0].conversation == [{"role": "user", "content": "<image>\nWhat is it?"},
                                      {"role": "assistant", "content": "Noise."}]
    assert [t["role"] for t in got[1][0].conversation] == ["user", "assistant", "user", "assistant"]
    assert got[1][1] == []  # text-only
    assert got[2][0].conversation[0] == {"role": "system", "content": "Be brief."}
    assert _same_images(got[0][1], [images / "a.png"])
    assert _same_images(got[2][1], [images / "b.png", images / "sub/d.png"])


def test_preference(tmp_path, images):
    scores = [{"helpfulness": 4 - k, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 1}
              for k in range(3)]
    src = _write(tmp_path / "pref.jsonl", [
        {"prompt": "Describe.", "chosen": "Good.", "rejected": "Bad.", "images": ["a.png"]},
        {"id": "p2", "prompt": [{"role": "user", "content": "<image>\nQ?"}], "chosen": "Yes.", "rejected": "No.",
         "image": "c.jpg", "meta": {"origin": "x"}},
        {"id": "p3", "prompt": "Rank.", "candidates": ["best", "mid", "worst"], "scores": scores, "image": "b.png"},
    ], lines=True)
    got = _read(_run("preference", src, images, tmp_path))
    (r1, i1), (r2, i2), (r3, i3) = got
    assert r1.id == "pref-000000000" and r1.prompt == [{"role": "user", "content": "Describe."}]
    assert (r1.chosen, r1.rejected) == ("Good.", "Bad.") and _same_images(i1, [images / "a.png"])
    assert r2.prompt[0]["content"] == "<image>\nQ?" and r2.meta == {"origin": "x", "source": "preference"}
    assert _same_images(i2, [images / "c.jpg"])  # JPEG bytes carried unchanged decode to the same pixels
    assert r3.candidates == ["best", "mid", "worst"] and r3.scores == scores
    assert (r3.chosen, r3.rejected) == ("best", "worst") and _same_images(i3, [images / "b.png"])


def test_unpaired(tmp_path, images):
    src = _write(tmp_path / "kto.jsonl", [
        {"prompt": "What colour?", "completion": "Red.", "label": True, "images": ["a.png"]},
        {"id": "u2", "prompt": [{"role": "user", "content": "<image>\nCount."}], "completion": "Nine.",
         "label": False, "image": "c.jpg"},
        {"prompt": "Q?", "completion": "A.", "label": "yes", "image": "a.png"},
    ], lines=True)
    summary = _run("unpaired", src, images, tmp_path, "--skip-bad")
    (r1, i1), (r2, i2) = _read(summary)
    assert isinstance(r1, UnpairedRecord) and (r1.completion, r1.label) == ("Red.", True)
    assert r2.id == "u2" and r2.label is False and r2.prompt[0]["content"] == "<image>\nCount."
    assert _same_images(i1, [images / "a.png"]) and _same_images(i2, [images / "c.jpg"])
    assert summary["skipped"] == {"wrong_type": 1}


def test_seva(tmp_path, images):
    src = _write(tmp_path / "seva.json", [
        {"chosen": "A chart.", "reject": "A cat.", "question": "What is shown?", "image_id": "a.png"},
        {"chosen": "Title.", "reject": "Nothing.", "question": "Read it.", "image_id": "c"},  # c -> c.jpg
    ])
    got = _read(_run("seva", src, images, tmp_path))
    assert [(r.prompt[0]["content"], r.chosen, r.rejected) for r, _ in got] == [
        ("What is shown?", "A chart.", "A cat."), ("Read it.", "Title.", "Nothing.")]
    assert _same_images(got[0][1], [images / "a.png"]) and _same_images(got[1][1], [images / "c.jpg"])
    assert got[0][0].meta["source"] == "seva"


def test_sima(tmp_path, images):
    def conv(answer):
        return [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": answer}]

    src = _write(tmp_path / "sima.json", [
        {"id": "000000401804", "image": "a.png", "conversations": conv("Elephants."),
         "rejected_conversations": conv("Horses.")}])
    (r, ims), = _read(_run("sima", src, images, tmp_path))
    assert isinstance(r, PreferenceRecord) and r.id == "000000401804"
    assert r.prompt == [{"role": "user", "content": "<image>\nDescribe."}]
    assert (r.chosen, r.rejected) == ("Elephants.", "Horses.") and _same_images(ims, [images / "a.png"])


def test_vla_ranked(tmp_path, images):
    src = _write(tmp_path / "vla.json", [
        {"id": "v1", "image": "a.png", "conversations": [
            {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": ["best", "ok", "worst"]}]},
        {"id": "v2", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "And?"}, {"from": "gpt", "value": ["good", "bad"]}]},
    ])
    (r1, i1), (r2, i2) = _read(_run("vla-ranked", src, images, tmp_path))
    assert r1.candidates == ["best", "ok", "worst"] and (r1.chosen, r1.rejected) == ("best", "worst")
    assert r1.prompt == [{"role": "user", "content": "What is it?\n<image>"}]
    assert r2.candidates == ["good", "bad"] and [t["role"] for t in r2.prompt] == ["user", "assistant", "user"]
    assert _same_images(i1, [images / "a.png"]) and _same_images(i2, [images / "b.png"])


def test_mllm_dpo(tmp_path, images):
    seed_layout = {  # as the seed's eval_logp script and train.py have it
        "question": repr({"from": "human", "value": "<image>\nWhat is shown?"}),
        "chosen": {"from": "gpt", "value": "A cat."}, "rejected": {"from": "gpt", "value": "A dog."},
        "image": "a.png", "ref_win_logp": -6.0, "ref_rej_logp": -12.5, "ref_win_avg_logp": -1.5,
        "ref_rej_avg_logp": -2.5, "ref_win_per_token_logp": [0.0] * 30, "ref_rej_per_token_logp": [0.0] * 30}
    documented = {"id": "m2", "prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "ref_chosen_logp": -3.0,
                  "ref_rejected_logp": -4.0, "ref_chosen_tokens": 3, "ref_rejected_tokens": 2}
    conversations = {"id": "m3", "image": "b.png",
                     "chosen": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "Right."}],
                     "rejected": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "Wrong."}],
                     "win_logp": -2.0, "rej_logp": -9.0, "win_avg_logp": -1.0, "rej_avg_logp": -3.0}
    src = _write(tmp_path / "dpo_logp.json", [seed_layout, documented, conversations])
    summary = _run("mllm-dpo", src, images, tmp_path, "--ref-model", "llava-13b")
    (r1, i1), (r2, i2), (r3, i3) = _read(summary)
    assert r1.prompt == [{"role": "user", "content": "<image>\nWhat is shown?"}]
    assert (r1.chosen, r1.rejected) == ("A cat.", "A dog.") and _same_images(i1, [images / "a.png"])
    assert r1.ref_logps["model"] == "llava-13b"
    assert r1.ref_logps["chosen"].to_json() == {"sum": -6.0, "mean": -1.5, "tokens": 4}
    assert r1.ref_logps["rejected"].to_json() == {"sum": -12.5, "mean": -2.5, "tokens": 5}
    assert r2.ref_logps["chosen"].to_json() == {"sum": -3.0, "mean": -1.0, "tokens": 3}  # mean = sum / tokens
    assert r2.ref_logps["rejected"].to_json() == {"sum": -4.0, "mean": -2.0, "tokens": 2} and i2 == []
    assert (r3.prompt[0]["content"], r3.chosen, r3.rejected) == ("<image>\nQ", "Right.", "Wrong.")
    assert r3.ref_logps["rejected"].to_json() == {"sum": -9.0, "mean": -3.0, "tokens": 3}


def test_mllm_dpo_log_probs_by_hand():
    with pytest.raises(convert.BadRecord, match="whole number of tokens"):
        convert.mllm_dpo_logp({"ref_win_logp": -5.0, "ref_win_avg_logp": -1.5}, "chosen")
    with pytest.raises(convert.BadRecord, match="mean"):
        convert.mllm_dpo_logp({"ref_rej_logp": -5.0}, "rejected")
    with pytest.raises(convert.BadRecord, match="!="):
        convert.mllm_dpo_logp({"ref_win_logp": -6.0, "ref_win_avg_logp": -1.0, "ref_chosen_tokens": 4}, "chosen")
    assert convert.mllm_dpo_logp({"ref_win_logp": -6.0, "ref_win_avg_logp": -6.0 / 7 + 1e-7}, "chosen")["tokens"] == 7


# ------------------------------------------------------------------------------------------------ bad records
def test_bad_record_in_a_json_array_names_file_line_and_item(tmp_path, images):
    good = {"chosen": "a", "reject": "b", "question": "q", "image_id": "a.png"}
    src = _write(tmp_path / "seva.json", [good, {**good, "chosen": None}, good])
    with pytest.raises(convert.ConvertError, match="missing_field") as e:
        _run("seva", src, images, tmp_path)
    assert f"{src}:3 (item 1)" in str(e.value) and "'chosen'" in str(e.value)
    assert glob.glob(str(tmp_path / "s-*.tar*")) == []  # the partial output is removed


@pytest.mark.parametrize("record, reason", [
    ({"id": "x", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                           {"from": "gpt", "value": "A"}]}, "missing_image"),
    ({"id": "x", "image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                          {"from": "gpt", "value": "A"}]}, "bad_image"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nQ"},
                                                     {"from": "gpt", "value": "A"}]}, "image_tokens"),
    ({"id": "x", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": 3}]}, "wrong_type"),
    ({"id": "x", "conversations": [{"from": "human", "value": "Q"}]}, "bad_record"),
    ({"id": "x"}, "missing_field"),
    ("{broken", "bad_json"),
    ("[1, 2]", "wrong_type"),
])
def test_bad_record_in_json_lines(tmp_path, images, record, reason):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    src = _write(tmp_path / "llava.jsonl", [good, record, good], lines=True)
    with pytest.raises(convert.ConvertError, match=reason) as e:
        _run("llava-sft", src, images, tmp_path)
    assert str(e.value).startswith(f"{src}:2: ")
    summary = _run("llava-sft", src, images, tmp_path, "--skip-bad")
    assert (summary["read"], summary["written"], summary["skipped"]) == (3, 2, {reason: 1})
    assert summary["examples"][reason][0].startswith(f"{src}:2: ")
    assert [r.id for r, _ in _read(summary)] == ["ok", "ok"]


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "Q", "chosen": "Same answer.", "rejected": " Same answer. "}, "identical_pair"),
    ({"prompt": "Q", "candidates": ["a", "b", "a"]}, "identical_pair"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "meta": {"score": float("nan")}}, "non_finite"),
    ('{"prompt": "Q", "chosen": "a", "rejected": "b", "meta": {"score": Infinity}}', "non_finite"),
    ('{"prompt": "Q", "chosen": "a \\ud800", "rejected": "b"}', "bad_json"),  # a lone surrogate
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "meta": {"deep": json.loads("[" * 70 + "]" * 70)}}, "bad_json"),
    ('{"prompt": "Q", "meta": ' + "[" * 5000 + "]" * 5000 + "}", "bad_json"),  # past Python's JSON parser
    ({"prompt": "<image>\n<image>\nQ", "chosen": "a", "rejected": "b"}, "image_tokens"),
    ({"prompt": [{"role": "assistant", "content": "Q"}], "chosen": "a", "rejected": "b"}, "bad_record"),
])
def test_schema_reasons_are_the_streams(tmp_path, images, record, reason):
    """A record the training stream would skip is refused before it is written, under the stream's reason."""
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    src = _write(tmp_path / "pairs.jsonl", [good, record, good], lines=True)
    with pytest.raises(convert.ConvertError, match=reason) as e:
        _run("preference", src, images, tmp_path)
    assert str(e.value).startswith(f"{src}:2: ")
    summary = _run("preference", src, images, tmp_path, "--skip-bad")
    assert (summary["read"], summary["written"], summary["skipped"]) == (3, 2, {reason: 1})
    assert len(_read(summary)) == 2


def test_skip_bad_counts_every_reason(tmp_path, images):
    def rec(**kw):
        return {"id": "s", "image": "a.png", "conversations": [{"from": "human", "value": "Q"},
                                                               {"from": "gpt", "value": "good"}],
                "rejected_conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "bad"}], **kw}

    src = _write(tmp_path / "sima.json", [
        rec(), rec(image="nope.png"), rec(image="nope.png"),
        rec(rejected_conversations=[{"from": "human", "value": "Other"}, {"from": "gpt", "value": "bad"}]), rec()])
    summary = _run("sima", src, images, tmp_path, "--skip-bad")
    assert (summary["read"], summary["written"]) == (5, 2)
    assert summary["skipped"] == {"missing_image": 2, "prompt_mismatch": 1}


def test_broken_json_array_names_the_line(tmp_path, images):
    src = tmp_path / "broken.json"
    src.write_text('[\n{"chosen": "a", "reject": "b", "question": "q", "image_id": "a.png"},\n{"chosen": }\n]')
    with pytest.raises(convert.ConvertError, match=f"{src}:3"):
        _run("seva", src, images, tmp_path, "--skip-bad")  # an array cannot be resynchronised: always an error


def test_empty_sources(tmp_path, images):
    for name, text in (("empty.json", "[]"), ("empty.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        summary = _run("preference", tmp_path / name, images, tmp_path)
        assert (summary["read"], summary["written"], summary["shards"]) == (0, 0, [])


def test_converters_are_plain_functions(images):
    record, paths = convert.seva({"chosen": "a", "reject": "b", "question": "q", "image_id": "c"}, str(images), "id0")
    assert record["kind"] == "preference" and record["id"] == "id0" and paths == [str(images / "c.jpg")]
    assert set(convert.CONVERTERS) == {"llava-sft", "preference", "seva", "sima", "vla-ranked", "mllm-dpo", "unpaired"}


def test_script_runs(tmp_path, images):
    src = _write(tmp_path / "seva.json", [{"chosen": "a", "reject": "b", "question": "q", "image_id": "a.png"},
                                          {"chosen": "a", "reject": "b", "question": "q", "image_id": "gone"}])
    cmd = [sys.executable, os.path.join(ROOT, "data_prep", "convert.py"), "seva", "--in", str(src),
           "--image-root", str(images), "--out", str(tmp_path / "out" / "s-%03d.tar"), "--no-progress"]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and f"{src}:3 (item 1): missing_image" in failed.stderr
    ok = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stderr[ok.stderr.index("{"):])["skipped"] == {"missing_image": 1}
