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
    assert set(convert.CONVERTERS) == {"llava-sft", "preference", "trl", "rlaif-v", "llamafactory-dpo",
                                       "llamafactory-sft", "swift", "seva", "seva-prompts", "sima", "sima-prompts",
                                       "vla-ranked", "mllm-dpo", "unpaired"}


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


# ------------------------------------------------------------------------------- the layouts people have (issue 14)
def _b64(path):
    import base64

    return base64.b64encode(open(path, "rb").read()).decode()


def _rlaif_row(images, idx, image, **kw):
    """One row of openbmb/RLAIF-V-Dataset as its card lists the columns (image: datasets' {"bytes", "path"})."""
    return {"ds_name": "RLAIF-V", "image": image, "question": "Describe the image in detail.",
            "chosen": "A noisy picture.", "rejected": "A cat on a sofa.", "origin_dataset": "COCO",
            "origin_split": json.dumps({"model": "llava15_7b", "feedback_model": "llava-next", "type": "detailed"}),
            "idx": idx, "image_path": "coco/0001.jpg", **kw}


def test_rlaif_v_json_lines(tmp_path, images):
    src = _write(tmp_path / "rlaif.jsonl", [
        _rlaif_row(images, "17", {"bytes": _b64(images / "c.jpg"), "path": "0001.jpg"}),
        _rlaif_row(images, "18", {"bytes": None, "path": "sub/d.png"}, chosen=" Leading space."),
    ], lines=True)
    (r1, i1), (r2, i2) = _read(_run("rlaif-v", src, images, tmp_path))
    assert r1.id == "RLAIF-V-17" and r1.prompt == [{"role": "user", "content": "Describe the image in detail."}]
    assert (r1.chosen, r1.rejected) == ("A noisy picture.", "A cat on a sofa.")
    assert r1.meta["origin_dataset"] == "COCO" and json.loads(r1.meta["origin_split"])["type"] == "detailed"
    assert r1.meta["source"] == "rlaif-v" and r1.meta["image_path"] == "coco/0001.jpg"
    assert _same_images(i1, [images / "c.jpg"]) and _same_images(i2, [images / "sub/d.png"])
    assert r2.chosen == "Leading space."


def test_parquet_needs_pyarrow_or_says_so(tmp_path, images):
    import importlib.util

    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed: test_rlaif_v_parquet_and_save_to_disk covers parquet")
    (tmp_path / "train-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(convert.ConvertError, match="needs pyarrow"):
        _run("rlaif-v", tmp_path / "train-00000.parquet", images, tmp_path)
    assert glob.glob(str(tmp_path / "s-*.tar*")) == []


def test_rlaif_v_parquet_and_save_to_disk(tmp_path, images):
    """The Hub's parquet (image bytes inside) and datasets' save_to_disk folder (Arrow stream files + state.json)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [_rlaif_row(images, str(i), {"bytes": open(images / name, "rb").read(), "path": name})
            for i, name in enumerate(("a.png", "c.jpg", "b.png"))]
    table = pa.Table.from_pylist(rows)
    assert pa.types.is_struct(table.schema.field("image").type)
    pq.write_table(table, str(tmp_path / "RLAIF-V-Dataset_000.parquet"), row_group_size=2)
    disk = tmp_path / "saved"
    disk.mkdir()
    with pa.OSFile(str(disk / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)
    (disk / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                 "_split": "train"}))
    (disk / "dataset_info.json").write_text("{}")
    for source in (tmp_path / "RLAIF-V-Dataset_000.parquet", disk):
        got = _read(_run("rlaif-v", source, images, tmp_path / f"out-{source.name}"))
        assert [r.id for r, _ in got] == ["RLAIF-V-0", "RLAIF-V-1", "RLAIF-V-2"]
        assert all(_same_images(ims, [images / n]) for (_, ims), n in zip(got, ("a.png", "c.jpg", "b.png")))
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(convert.ConvertError, match="give one split's folder"):
        _run("rlaif-v", tmp_path / "dd", images, tmp_path)


def test_trl_conversational(tmp_path, images, tiny_processor_backbone):
    """TRL's conversational vision preference layout (typed content) and its implicit prompt."""
    from vlalign.data.chat import Encoder

    def user(*parts):
        return {"role": "user", "content": list(parts)}

    def assistant(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    src = _write(tmp_path / "trl.jsonl", [
        {"images": ["a.png"], "prompt": [user(image, text("What colour is it?"))],
         "chosen": [assistant(" Red.")], "rejected": [assistant(" Blue.")]},
        {"images": [{"bytes": _b64(images / "b.png"), "path": None}, "c.jpg"],
         "prompt": [user(image, image, text("Compare them."))], "chosen": [assistant("Same.")],
         "rejected": [assistant("Different.")]},
        {"images": ["a.png"], "chosen": [user(image, text("Q?")), assistant("Yes.")],  # implicit prompt
         "rejected": [user(image, text("Q?")), assistant("No.")]},
        {"images": ["a.png"], "prompt": "<image>\nThe sky is", "chosen": " blue.", "rejected": " green."},  # standard
    ], lines=True)
    (r1, i1), (r2, i2), (r3, i3), (r4, _) = _read(_run("trl", src, images, tmp_path))
    assert r1.prompt == [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    assert (r1.chosen, r1.rejected) == ("Red.", "Blue.") and _same_images(i1, [images / "a.png"])
    assert r2.prompt[0]["content"] == "<image>\n<image>\nCompare them."
    assert _same_images(i2, [images / "b.png", images / "c.jpg"])  # embedded bytes, then a path
    assert r3.prompt == [{"role": "user", "content": "<image>\nQ?"}] and (r3.chosen, r3.rejected) == ("Yes.", "No.")
    assert (r4.chosen, r4.rejected) == ("blue.", "green.")
    enc = Encoder(tiny_processor_backbone.tokenizer, tiny_processor_backbone.processor.chat_template,
                  tiny_processor_backbone.num_image_tokens)
    assert enc.render(r1.prompt, add_generation_prompt=True) == "USER: <image>\nWhat colour is it? ASSISTANT:"


def test_llamafactory_dpo_and_sft(tmp_path, images):
    """LLaMA-Factory's sharegpt preference layout (dataset_info: ranking, formatting sharegpt, columns messages /
    chosen / rejected / images) and the messages layout of its multimodal demo data (mllm_demo.json)."""
    dpo = _write(tmp_path / "rlhf_v.json", [
        {"conversations": [{"from": "human", "value": "<image>What is in the picture?"}],
         "chosen": {"from": "gpt", "value": "A noisy square."}, "rejected": {"from": "gpt", "value": "A cat."},
         "images": ["a.png"]},
        {"conversations": [{"from": "human", "value": "<image>Describe it."}, {"from": "gpt", "value": "Noise."},
                           {"from": "human", "value": "Any colour?"}],
         "chosen": {"from": "gpt", "value": "Many."}, "rejected": {"from": "gpt", "value": "Only red."},
         "system": "Be brief.", "images": ["c.jpg"]},
    ])
    (r1, i1), (r2, i2) = _read(_run("llamafactory-dpo", dpo, images, tmp_path / "dpo"))
    assert r1.prompt == [{"role": "user", "content": "<image>What is in the picture?"}]
    assert (r1.chosen, r1.rejected) == ("A noisy square.", "A cat.") and _same_images(i1, [images / "a.png"])
    assert [t["role"] for t in r2.prompt] == ["system", "user", "assistant", "user"]
    assert r2.prompt[0]["content"] == "Be brief." and _same_images(i2, [images / "c.jpg"])
    sft = _write(tmp_path / "mllm_demo.json", [
        {"messages": [{"content": "<image>Who are they?", "role": "user"},
                      {"content": "Two squares.", "role": "assistant"},
                      {"content": "What are they doing?", "role": "user"},
                      {"content": "Nothing.", "role": "assistant"}], "images": ["sub/d.png"]},
        {"messages": [{"content": "Please describe this image", "role": "user"},  # the older demo: no <image>
                      {"content": "Noise.", "role": "assistant"}], "images": ["b.png"]},
    ])
    (s1, j1), (s2, j2) = _read(_run("llamafactory-sft", sft, images, tmp_path / "sft"))
    assert isinstance(s1, SFTRecord) and [t["role"] for t in s1.conversation] == ["user", "assistant"] * 2
    assert s1.conversation[0]["content"] == "<image>Who are they?" and _same_images(j1, [images / "sub/d.png"])
    assert s2.conversation[0]["content"] == "Please describe this image" and _same_images(j2, [images / "b.png"])


def test_swift(tmp_path, images):
    """ms-swift's RLHF layout: messages + rejected_response (or rejected_messages) + images."""
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A square."}]
    src = _write(tmp_path / "swift.jsonl", [
        {"messages": msgs, "rejected_response": "A kitten.", "images": ["a.png"]},
        {"messages": msgs, "images": ["a.png"], "rejected_images": ["a.png"],
         "rejected_messages": msgs[:2] + [{"role": "assistant", "content": "A puppy."}]},
        {"messages": msgs, "rejected_response": "A kitten.", "images": ["a.png"], "rejected_images": ["b.png"]},
    ], lines=True)
    summary = _run("swift", src, images, tmp_path, "--skip-bad")
    (r1, i1), (r2, _) = _read(summary)
    assert r1.prompt == [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "<image>What is this?"}]
    assert (r1.chosen, r1.rejected) == ("A square.", "A kitten.") and _same_images(i1, [images / "a.png"])
    assert r2.rejected == "A puppy." and r1.meta["source"] == "ms-swift"
    assert summary["skipped"] == {"unsupported": 1}  # different images for chosen and rejected: not supported
    assert "rejected_images" in summary["examples"]["unsupported"][0]


def test_seva_and_sima_prompt_files_feed_the_pair_scripts(tmp_path, images):
    """SeVa's step-1 image-question list and SIMA's question file become prompt shards that read_samples (what
    seva_pairs.py / sima_pairs.py read) yields, the ground truth as the answer SIMA's critic needs."""
    import seva_pairs
    import sima_pairs
    from vlalign.data.schema import PromptRecord
    from vlalign.generation import read_samples

    seva = _write(tmp_path / "ocrvqa_image_question_list_8k.json", [
        {"image": "a.png", "text": "What is the title of this book?"},
        {"image": "c.jpg", "text": "Is this a kids book? Answer the question using a single word or phrase."},
    ], lines=True)
    sima = _write(tmp_path / "sima_questions.jsonl", [
        {"question_id": 7, "image": "b.png", "text": "Describe the image.", "ground_truth": " Two noisy shapes."},
        {"image": "sub/d.png", "text": "Describe the image."},  # no ground truth: SIMA cannot judge it
    ], lines=True)
    seva_summary = _run("seva-prompts", seva, images, tmp_path / "seva")
    sima_summary = _run("sima-prompts", sima, images, tmp_path / "sima", "--skip-bad")
    assert sima_summary["skipped"] == {"missing_field": 1}
    got = list(read_samples(seva_summary["shards"]))
    assert all(isinstance(r, PromptRecord) for r, _ in got) and [len(ims) for _, ims in got] == [1, 1]
    assert got[0][0].prompt == [{"role": "user", "content": "What is the title of this book?"}]
    assert got[0][0].answer is None and np.array_equal(np.asarray(got[1][1][0]), _pixels(images / "c.jpg"))
    stripped = seva_pairs.strip_suffix(got[1][0], seva_pairs.OCRVQA_SUFFIX)
    assert stripped.prompt[0]["content"] == "Is this a kids book?"
    (record, ims), = read_samples(sima_summary["shards"])
    assert record.id == "7" and record.answer == "Two noisy shapes." and record.meta["source"] == "sima"
    assert sima_pairs.question_of(record) == "Describe the image." and _same_images(ims, [images / "b.png"])


def test_vla_multi_image_and_ranked_text_around_the_image(tmp_path, images, tiny_processor_backbone):
    """Vision-LLM-Alignment: comma-joined image paths under one <image>, and a ranked sample whose question has text
    on both sides of <image>, rendered by the template without gluing "doing?" to "### Answer:"."""
    from vlalign.data.chat import Encoder

    sft = _write(tmp_path / "sft_samples_multi_image.json", [
        {"id": "000000033471", "image": "a.png,b.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "White and red."}]},
    ])
    (s, ims), = _read(_run("llava-sft", sft, images, tmp_path / "sft"))
    assert s.conversation[0]["content"] == "<image>\n<image>\nWhat are the colors of the bus in the image?"
    assert _same_images(ims, [images / "a.png", images / "b.png"])
    enc = Encoder(tiny_processor_backbone.tokenizer, tiny_processor_backbone.processor.chat_template,
                  tiny_processor_backbone.num_image_tokens)
    ids, _ = enc.conversation(s.conversation)
    assert ids.count(tiny_processor_backbone.image_token_id) == 2 * tiny_processor_backbone.num_image_tokens

    question = ("What are the people in the image doing?\n<image>\n\n### Answer:\nWalking.\n\n### Question:\n"
                "Why are they walking?")
    ranked = _write(tmp_path / "reward_samples.json", [
        {"id": "000000013249", "image": "a.png", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": ["A festival.", "No reason."]}]},
    ])
    (r, _), = _read(_run("vla-ranked", ranked, images, tmp_path / "ranked"))
    assert r.prompt[0]["content"] == ("<image>\nWhat are the people in the image doing?\n\n### Answer:\nWalking."
                                      "\n\n### Question:\nWhy are they walking?")
    text = enc.render(r.prompt, add_generation_prompt=True)
    assert "doing?\n\n### Answer:\nWalking." in text and "doing?###" not in text
    assert text.startswith("USER: <image>\nWhat are") and text.count("<image>") == 1


_LEADING_SPACE = [  # (format, a record in that layout whose responses start with a space, the record's responses)
    ("preference", {"prompt": "Q?", "chosen": " yes.", "rejected": " no."}, lambda r: [r.chosen, r.rejected]),
    ("trl", {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Q?"}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": " yes."}]}],
             "rejected": [{"role": "assistant", "content": " no."}]}, lambda r: [r.chosen, r.rejected]),
    ("preference", {"prompt": "Q?", "candidates": [" a.", " b.", " c."]}, lambda r: r.candidates),
    ("unpaired", {"prompt": "Q?", "completion": " yes.", "label": True}, lambda r: [r.completion]),
    ("llava-sft", {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": " yes."}]},
     lambda r: [r.conversation[1]["content"]]),
    ("llamafactory-sft", {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " a."}]},
     lambda r: [r.conversation[1]["content"]]),
    ("llamafactory-dpo", {"conversations": [{"from": "human", "value": "Q?"}],
                          "chosen": {"from": "gpt", "value": " a."}, "rejected": {"from": "gpt", "value": " b."}},
     lambda r: [r.chosen, r.rejected]),
    ("swift", {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " a."}],
               "rejected_response": " b."}, lambda r: [r.chosen, r.rejected]),
    ("rlaif-v", {"image": {"bytes": None, "path": "a.png"}, "question": "Q?", "chosen": " a.", "rejected": " b."},
     lambda r: [r.chosen, r.rejected]),
    ("seva", {"chosen": " a.", "reject": " b.", "question": "Q?", "image_id": "a.png"},
     lambda r: [r.chosen, r.rejected]),
    ("sima", {"image": "a.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": " a."}],
              "rejected_conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": " b."}]},
     lambda r: [r.chosen, r.rejected]),
    ("sima-prompts", {"image": "a.png", "text": "Q?", "ground_truth": " a."}, lambda r: [r.answer]),
    ("vla-ranked", {"image": "a.png", "conversations": [{"from": "human", "value": "Q?"},
                                                        {"from": "gpt", "value": [" a.", " b."]}]},
     lambda r: r.candidates + [r.chosen, r.rejected]),
    ("mllm-dpo", {"question": "Q?", "chosen": " a.", "rejected": " b.", "ref_win_logp": -2.0, "ref_rej_logp": -2.0,
                  "ref_win_avg_logp": -1.0, "ref_rej_avg_logp": -1.0}, lambda r: [r.chosen, r.rejected]),
]


@pytest.mark.parametrize("fmt, record, responses", _LEADING_SPACE, ids=[f for f, _, _ in _LEADING_SPACE])
def test_leading_space_is_stripped_in_every_converter(tmp_path, images, fmt, record, responses):
    """TRL's " answer" convention would tokenise the space on its own: every converter stores the bare text."""
    (r, _), = _read(_run(fmt, _write(tmp_path / "src.jsonl", [record], lines=True), images, tmp_path))
    assert responses(r) and all(t == t.strip() and t for t in responses(r))


def test_stored_ref_logps_are_checked_only_for_a_precomputed_reference(tmp_path, images, tiny_processor_backbone):
    """mllm-dpo's log-probs count tokens of LLaVA-1.5-13B's tokenizer: an adapter run must train on the pairs
    (ignoring them), a precomputed run must refuse them (ref_mismatch)."""
    from vlalign.backbone import BackboneConfig, LoraSpec
    from vlalign.data.module import ShardDataModule
    from vlalign.dpo import DPOModule

    rows = [{"id": f"m{i}", "question": repr({"from": "human", "value": "<image>\nWhat is shown?"}),
             "chosen": {"from": "gpt", "value": f"A square number {i}."},
             "rejected": {"from": "gpt", "value": "A cat."},
             "image": "a.png", "ref_win_logp": -40.0, "ref_rej_logp": -30.0, "ref_win_avg_logp": -1.0,
             "ref_rej_avg_logp": -1.0} for i in range(3)]  # 40 and 30 tokens: not this tokenizer's counts
    summary = _run("mllm-dpo", _write(tmp_path / "dpo_logp.json", rows), images, tmp_path)
    lora = BackboneConfig(lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    for reference, kept, skipped in (("adapter", 3, {}), ("precomputed", 0, {"ref_mismatch": 3})):
        spec = DPOModule(lora, reference=reference).batch_spec()
        assert spec["ref_logps"] is (reference == "precomputed")
        dm = ShardDataModule(train=summary["shards"], val=None, batch_size=4, num_workers=0)
        dm.attach(tiny_processor_backbone, spec)
        batches = list(dm.train_dataloader())
        assert sum(len(b["ids"]) for b in batches) == kept and dict(dm.skipped) == skipped
        assert all("ref_logps_sum" not in b for b in batches)
