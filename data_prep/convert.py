"""Convert the data files of LLaVA and of the four seed systems into our shards (``vlalign.data.schema``).

    python data_prep/convert.py FORMAT --in FILE --out "data/NAME/train-%06d.tar" [--image-root DIR] \
        [--shard-size 1000 --skip-bad --no-progress]

    python data_prep/convert.py llava-sft --in llava_v1_5_mix665k.json --image-root /data --out data/sft/train-%06d.tar
    python data_prep/convert.py seva --in merged_answer_file_8k_diffusion_step500.json \
        --image-root /data/ocrvqa/images --out data/seva/train-%06d.tar
    python data_prep/convert.py mllm-dpo --in dpo_logp.json --image-root /data/lrv --out data/mllm/train-%06d.tar \
        --ref-model llava-v1.5-13b

FILE is a JSON array or JSON lines (one object per line), told apart by its first character. Image paths in it are
relative to ``--image-root`` (default: FILE's directory). Runs on one CPU; for a huge file, split it and run one
process per part with its own ``--out``. Formats (one function each below, ``CONVERTERS``):

    llava-sft   LLaVA: {"id", "image"?, "conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
                -> sft; "image" may be a path or a list of paths; records without one are text-only.
    preference  {"id"?, "prompt", "chosen", "rejected", "images": [paths] | "image": path,
                 "candidates"?, "scores"?, "meta"?} -> preference; the prompt is a string or a list of turns
                ({"role", "content"} or {"from", "value"}); "candidates" (ranked, best first) and "scores" (one
                object per candidate) are kept, chosen/rejected then default to the first/last candidate.
    seva        SeVa's step-3 pairs: {"chosen", "reject", "question", "image_id"} -> preference; the image is
                image_root/image_id, or image_root/image_id + ".jpg" (SeVa's TextVQA ids have no suffix).
    sima        SIMA's dataset_for_dpo.py: {"id", "image", "conversations", "rejected_conversations"} -> preference;
                prompt = the turns before the last gpt turn (the same in both), chosen / rejected = that last gpt
                turn of conversations / rejected_conversations.
    vla-ranked  Vision-LLM-Alignment's RM/DPO data: LLaVA {"id", "image", "conversations"} whose last gpt "value"
                is a list of k >= 2 responses ranked best to worst -> preference with "candidates".
    mllm-dpo    mllm-dpo's DPO file with reference log-probs -> preference with "ref_logps" (see below).
    unpaired    TRL's unpaired layout for KTO: {"id"?, "prompt", "completion", "label": true|false,
                "images": [paths] | "image": path} -> unpaired (label true: desirable).

mllm-dpo's layout (its ``train.py`` ``encode_multimodal_preference_sample`` and ``eval_logp_for_ddp_scriptversion.py``):
"question" is a LLaVA turn {"from": "human", "value"}, or that dict's Python repr (the seed parses it with
``ast.literal_eval``), or a plain string; "chosen" / "rejected" are gpt turns {"from": "gpt", "value"} or strings,
or whole LLaVA conversations (lists, prompt included); "image" is optional. Reference log-probs of the response
(the seed's reference was LLaVA-1.5-13B; name it with ``--ref-model``), for side in chosen/rejected:

    sum     "ref_win_logp" / "ref_rej_logp"          (also "win_logp" / "rej_logp", "ref_chosen_logp" / ...)
    mean    "ref_win_avg_logp" / "ref_rej_avg_logp"  (also "win_avg_logp", "ref_chosen_avg_logp", ...)
    tokens  "ref_chosen_tokens" / "ref_rejected_tokens" (also "ref_win_tokens" / "ref_rej_tokens")

At least one of mean and tokens is needed: tokens = round(sum / mean) (the seed stores no count; its mean is
sum / count) and mean = sum / tokens; a sum/mean ratio that is not a whole number is a bad record. The seed's
per-token lists ("ref_win_per_token_logp") are not used: they cover the whole padded sequence, unmasked. The
training pipeline checks ``tokens`` against its own count of each response and refuses log-probs made with another
tokenizer or chat template (``ref_mismatch``); if that happens, recompute them with ``data_prep/precompute_ref.py``.

Every record is checked: fields present and of the right type, images present and decodable, ``<image>``
placeholders matching the images, and the schema's own rules, each counted under the reason the training stream
would skip the record for (``identical_pair``: chosen equal to rejected; ``non_finite``: NaN / Infinity, which
Python's JSON reader accepts; ``bad_json``: a lone surrogate, nesting deeper than the schema's limit;
``image_tokens``; ``bad_record``: any other schema rule). A bad record stops the run with a message naming the
file and line (for a JSON array also the item's index), and the shards written so far are removed; with
``--skip-bad`` it is skipped and counted by reason in the summary printed at the end (records read, written,
skipped by reason, the first messages of each reason). Images are copied byte for byte (PNG, JPEG, WebP); other
formats, or a record mixing formats, are re-encoded as PNG. Records without an id get ``<file stem>-<index>``.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

from PIL import Image, UnidentifiedImageError

from vlalign.data.schema import RecordError, check_json_value, parse_record, with_images
from vlalign.data.shards import ShardWriter

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMAT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
MLLM_DPO_REF_MODEL = "llava-v1.5-13b (mllm-dpo)"
EXAMPLES_PER_REASON = 3


class BadRecord(ValueError):
    """A source record that cannot be converted; ``reason`` is a short tag for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ConvertError(ValueError):
    """A run stopped by a bad record or a broken file; the message names the file and line."""


Converted = tuple[dict, list[str]]  # (schema record as JSON, image paths)


# ------------------------------------------------------------------------------------------ field helpers
def _get(src: dict, key: str, kind: type | tuple, what: str) -> Any:
    if key not in src or src[key] is None:
        raise BadRecord("missing_field", f"'{key}' is missing")
    value = src[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRecord("wrong_type", f"'{key}' must be {what}, got {type(value).__name__}")
    return value


def _text(src: dict, key: str) -> str:
    value = _get(src, key, str, "a string")
    if not value.strip():
        raise BadRecord("wrong_type", f"'{key}' is empty")
    return value


def _turns(value: Any, key: str) -> list[dict]:
    """A prompt or conversation as schema turns, from a string, {"role", "content"} or LLaVA {"from", "value"}."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRecord("wrong_type", f"'{key}' must be a string or a non-empty list of turns")
    turns = []
    for i, t in enumerate(value):
        if isinstance(t, dict) and "from" in t:
            role, content = ROLES.get(str(t["from"]).lower()), t.get("value")
        elif isinstance(t, dict):
            role, content = ROLES.get(t.get("role")), t.get("content")
        else:
            raise BadRecord("wrong_type", f"'{key}[{i}]' must be a turn object, got {type(t).__name__}")
        if role is None:
            raise BadRecord("wrong_type", f"'{key}[{i}]' has an unknown speaker {t.get('from', t.get('role'))!r}")
        if not isinstance(content, str):
            raise BadRecord("wrong_type", f"'{key}[{i}]' text must be a string, got {type(content).__name__}")
        turns.append({"role": role, "content": content})
    return turns


def _split_last_answer(turns: list[dict], key: str) -> tuple[list[dict], str]:
    """``(prompt turns, final answer)`` of a conversation that ends with an assistant turn."""
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise BadRecord("wrong_type", f"'{key}' must end with a gpt turn after a human turn")
    return turns[:-1], turns[-1]["content"]


def _image_paths(src: dict, image_root: str) -> list[str]:
    key = "images" if "images" in src else "image"
    value = src.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRecord("wrong_type", f"'{key}' must be a path or a list of paths")
    return [os.path.join(image_root, v) for v in value]


def _id(src: dict, default_id: str) -> str:
    rid = src.get("id")
    if rid is None:
        return default_id
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise BadRecord("wrong_type", f"'id' must be a string or an integer, got {type(rid).__name__}")
    return str(rid)


def _preference(rid: str, prompt: list[dict], chosen: str, rejected: str, source: str, **extra) -> dict:
    return {"kind": "preference", "id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "meta": {"source": source}, **extra}


# --------------------------------------------------------------------------------------------- converters
def llava_sft(src: dict, image_root: str, default_id: str) -> Converted:
    """LLaVA conversation record -> sft record."""
    conversation = _turns(_get(src, "conversations", list, "a list of turns"), "conversations")
    record = {"kind": "sft", "id": _id(src, default_id), "conversation": conversation, "meta": {"source": "llava"}}
    return record, _image_paths(src, image_root)


def preference(src: dict, image_root: str, default_id: str) -> Converted:
    """The common preference layout -> preference record (candidates, scores and meta kept)."""
    if "prompt" not in src:
        raise BadRecord("missing_field", "'prompt' is missing")
    prompt = _turns(src["prompt"], "prompt")
    extra: dict = {}
    cands = src.get("candidates")
    if cands is not None:
        if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) for c in cands):
            raise BadRecord("wrong_type", "'candidates' must be a list of at least 2 strings, best first")
        extra["candidates"] = cands
    if src.get("scores") is not None:
        extra["scores"] = _get(src, "scores", list, "a list of objects, one per candidate")
    chosen = _text(src, "chosen") if cands is None or "chosen" in src else cands[0]
    rejected = _text(src, "rejected") if cands is None or "rejected" in src else cands[-1]
    record = _preference(_id(src, default_id), prompt, chosen, rejected, "preference", **extra)
    if src.get("meta") is not None:
        record["meta"] = {**_get(src, "meta", dict, "an object"), **record["meta"]}
    return record, _image_paths(src, image_root)


def seva(src: dict, image_root: str, default_id: str) -> Converted:
    """SeVa's {"chosen", "reject", "question", "image_id"} -> preference record."""
    prompt = [{"role": "user", "content": _text(src, "question")}]
    record = _preference(_id(src, default_id), prompt, _text(src, "chosen"), _text(src, "reject"), "seva")
    path = os.path.join(image_root, _text(src, "image_id"))
    for candidate in (path, path + ".jpg"):
        if os.path.isfile(candidate):
            return record, [candidate]
    raise BadRecord("missing_image", f"image {path} (or {path}.jpg) not found")


def sima(src: dict, image_root: str, default_id: str) -> Converted:
    """SIMA's {"id", "image", "conversations", "rejected_conversations"} -> preference record."""
    prompt, chosen = _split_last_answer(_turns(_get(src, "conversations", list, "a list of turns"),
                                               "conversations"), "conversations")
    rprompt, rejected = _split_last_answer(_turns(_get(src, "rejected_conversations", list, "a list of turns"),
                                                  "rejected_conversations"), "rejected_conversations")
    if rprompt != prompt:
        raise BadRecord("prompt_mismatch", "'rejected_conversations' asks something else than 'conversations'")
    return _preference(_id(src, default_id), prompt, chosen, rejected, "sima"), _image_paths(src, image_root)


def vla_ranked(src: dict, image_root: str, default_id: str) -> Converted:
    """Vision-LLM-Alignment's ranked record (last gpt value = [best, ..., worst]) -> preference with candidates."""
    conv = _get(src, "conversations", list, "a list of turns")
    if not conv or not isinstance(conv[-1], dict) or ROLES.get(str(conv[-1].get("from")).lower()) != "assistant":
        raise BadRecord("wrong_type", "'conversations' must end with a gpt turn holding the ranked responses")
    cands = conv[-1].get("value")
    if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) and c.strip() for c in cands):
        raise BadRecord("wrong_type", "the last gpt 'value' must be a list of at least 2 ranked responses")
    prompt = _turns(conv[:-1], "conversations") if len(conv) > 1 else []
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("wrong_type", "the ranked responses must follow a human turn")
    record = _preference(_id(src, default_id), prompt, cands[0], cands[-1], "vision-llm-alignment",
                         candidates=cands)
    return record, _image_paths(src, image_root)


def _number(src: dict, keys: Sequence[str]) -> Optional[float]:
    for key in keys:
        if src.get(key) is not None:
            value = src[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BadRecord("bad_logps", f"'{key}' must be a finite number, got {value!r:.40}")
            return float(value)
    return None


def mllm_dpo_logp(src: dict, side: str) -> dict:
    """``{"sum", "mean", "tokens"}`` of the reference log-prob of ``side`` ("chosen" or "rejected")."""
    short = {"chosen": "win", "rejected": "rej"}[side]
    sums = (f"ref_{short}_logp", f"{short}_logp", f"ref_{side}_logp")
    means = (f"ref_{short}_avg_logp", f"{short}_avg_logp", f"ref_{side}_avg_logp")
    counts = (f"ref_{side}_tokens", f"ref_{short}_tokens")
    total, mean, tokens = _number(src, sums), _number(src, means), _number(src, counts)
    if total is None:
        raise BadRecord("missing_field", f"the reference log-prob of {side} is missing (one of {', '.join(sums)})")
    if tokens is None and mean is None:
        raise BadRecord("missing_field", f"{side} needs a mean ({means[0]}) or a token count ({counts[0]})")
    if tokens is None:
        ratio = total / mean if mean else float("nan")
        if not math.isfinite(ratio) or round(ratio) < 1 or abs(ratio - round(ratio)) > 1e-3 * max(1.0, ratio):
            raise BadRecord("bad_logps", f"{side}: sum {total} / mean {mean} is not a whole number of tokens")
        tokens = round(ratio)
    elif tokens != int(tokens) or tokens < 1:
        raise BadRecord("bad_logps", f"{side}: the token count must be a whole number >= 1, got {tokens}")
    tokens = int(tokens)
    if mean is None:
        mean = total / tokens
    elif abs(total / tokens - mean) > 1e-4 * abs(mean) + 1e-6:
        raise BadRecord("bad_logps", f"{side}: mean {mean} != sum {total} / tokens {tokens}")
    return {"sum": total, "mean": mean, "tokens": tokens}


def _mllm_question(value: Any) -> list[dict]:
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:  # the seed stores the turn dict's repr; a question that merely starts with "{" stays text
            parsed = ast.literal_eval(value)
            value = parsed if isinstance(parsed, dict) else value
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    if isinstance(value, dict):
        value = [value]
    turns = _turns(value, "question")
    if turns[-1]["role"] != "user":
        raise BadRecord("wrong_type", "'question' must end with a human turn")
    return turns


def _mllm_answer(value: Any, key: str) -> str:
    if isinstance(value, dict):
        turns = _turns([value], key)
        if turns[0]["role"] != "assistant":
            raise BadRecord("wrong_type", f"'{key}' must be a gpt turn")
        value = turns[0]["content"]
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("wrong_type", f"'{key}' must be a gpt turn or a non-empty string")
    return value


def mllm_dpo(src: dict, image_root: str, default_id: str, ref_model: str = MLLM_DPO_REF_MODEL) -> Converted:
    """mllm-dpo's DPO record with reference log-probs -> preference record with ``ref_logps`` (module docstring)."""
    for key in ("chosen", "rejected"):
        if src.get(key) is None:
            raise BadRecord("missing_field", f"'{key}' is missing")
    if isinstance(src["chosen"], list):  # whole conversations, prompt included
        prompt, chosen = _split_last_answer(_turns(src["chosen"], "chosen"), "chosen")
        rprompt, rejected = _split_last_answer(_turns(_get(src, "rejected", list, "a list of turns"), "rejected"),
                                               "rejected")
        if rprompt != prompt:
            raise BadRecord("prompt_mismatch", "'rejected' asks something else than 'chosen'")
    else:
        key = "question" if src.get("question") is not None else "prompt"
        if src.get(key) is None:
            raise BadRecord("missing_field", "'question' (or 'prompt') is missing")
        prompt = _mllm_question(src[key])
        chosen, rejected = _mllm_answer(src["chosen"], "chosen"), _mllm_answer(src["rejected"], "rejected")
    ref = {"model": ref_model, "chosen": mllm_dpo_logp(src, "chosen"), "rejected": mllm_dpo_logp(src, "rejected")}
    record = _preference(_id(src, default_id), prompt, chosen, rejected, "mllm-dpo", ref_logps=ref)
    return record, _image_paths(src, image_root)


def unpaired(src: dict, image_root: str, default_id: str) -> Converted:
    """TRL's unpaired {"prompt", "completion", "label"} -> unpaired record (KTO)."""
    if "prompt" not in src:
        raise BadRecord("missing_field", "'prompt' is missing")
    label = src.get("label")
    if not isinstance(label, bool):
        raise BadRecord("wrong_type", f"'label' must be true (desirable) or false (undesirable), got {label!r:.40}")
    record = {"kind": "unpaired", "id": _id(src, default_id), "prompt": _turns(src["prompt"], "prompt"),
              "completion": _text(src, "completion"), "label": label, "meta": {"source": "unpaired"}}
    return record, _image_paths(src, image_root)


CONVERTERS: dict[str, Callable[..., Converted]] = {
    "llava-sft": llava_sft, "preference": preference, "seva": seva, "sima": sima, "vla-ranked": vla_ranked,
    "mllm-dpo": mllm_dpo, "unpaired": unpaired,
}


# ------------------------------------------------------------------------------------------ reading files
_SPACE = re.compile(r"\s*")


def _json_array(path: str, text: str, start: int) -> Iterator[tuple[str, Any]]:
    decoder = json.JSONDecoder()
    pos, line, counted, index = _SPACE.match(text, start + 1).end(), 1, 0, 0
    if text.startswith("]", pos):
        return
    while True:
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}:{e.lineno} (item {index}): broken JSON: {e.msg}") from e
        except RecursionError as e:  # Python's JSON parser gives up at ~1000 levels; the item's end is unknown
            raise ConvertError(f"{path}:{line} (item {index}): bad_json: JSON nested too deeply to parse") from e
        yield f"{path}:{line} (item {index})", obj
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos, index = _SPACE.match(text, pos + 1).end(), index + 1
        elif text.startswith("]", pos) and not text[pos + 1:].strip():
            return
        else:
            where = line + text.count("\n", counted, pos)
            raise ConvertError(f"{path}:{where}: expected ',' or a final ']' after item {index}")


def read_source(path: str) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` for every record of a JSON array or JSON-lines file; ``where`` is ``file:line`` (plus
    ``(item i)`` in an array). A broken JSON line gives a ``BadRecord`` in place of its object."""
    with open(path, encoding="utf-8-sig") as f:
        first = ""
        while not first and (chunk := f.read(1 << 16)):
            first = chunk.lstrip()[:1]
        f.seek(0)
        if first == "[":
            text = f.read()
            yield from _json_array(path, text, text.index("["))
            return
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                obj = BadRecord("bad_json", f"broken JSON: {e.msg} (expected a JSON array or one object per line)")
            except RecursionError:  # Python's JSON parser gives up at ~1000 levels (the schema allows 64)
                obj = BadRecord("bad_json", "JSON nested too deeply to parse")
            yield f"{path}:{number}", obj


def load_images(paths: Sequence[str]) -> tuple[str, list[bytes]]:
    """``(extension, [bytes])`` of the image files, checked to decode; bytes unchanged when all share an
    allowed format, else every image re-encoded as PNG. Raises ``BadRecord``."""
    raw, formats = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BadRecord("missing_image", f"image {path} not found") from None
        except OSError as e:
            raise BadRecord("missing_image", f"image {path} cannot be read ({e})") from e
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                formats.append(im.format)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadRecord("bad_image", f"image {path} cannot be decoded ({e})") from e
        raw.append(data)
    if len(set(formats)) <= 1 and all(f in FORMAT_EXTENSIONS for f in formats):
        return FORMAT_EXTENSIONS[formats[0]] if formats else "png", raw
    pngs = []
    for data in raw:
        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return "png", pngs


def check_record(record: dict, n_images: int) -> None:
    """The schema's rules, the JSON values a shard may hold, and ``<image>`` placeholders that match the images.

    Raises ``BadRecord`` under the schema's own reason (``RecordError.reason``): ``identical_pair`` (chosen equal to
    rejected, a repeated candidate), ``non_finite`` (NaN / Infinity, which Python's JSON reader accepts),
    ``bad_json`` (a lone surrogate from a ``"\\ud800"`` escape, nesting deeper than ``MAX_JSON_DEPTH``),
    ``image_tokens``, or ``bad_record`` for any other schema rule: the reasons the training stream would skip the
    record under, found before it is written.
    """
    try:
        check_json_value(record)
        parsed = parse_record(record)
    except RecordError as e:
        raise BadRecord(e.reason, str(e)) from e
    try:
        with_images(parsed.conversation if record["kind"] == "sft" else parsed.prompt, n_images)
    except RecordError as e:
        raise BadRecord("image_tokens", str(e)) from e


# ------------------------------------------------------------------------------------------------- the loop
def convert_file(fmt: str, path: str, out: str, image_root: Optional[str] = None, shard_size: int = 1000,
                 skip_bad: bool = False, progress: bool = True, **options) -> dict:
    """Convert one source file with ``CONVERTERS[fmt]`` into shards at ``out``; returns the summary.

    A bad record raises ``ConvertError`` naming ``file:line`` (and removes the shards written so far) unless
    ``skip_bad``, which counts it by reason. ``options`` go to the converter (``ref_model`` for mllm-dpo).
    """
    from tqdm.auto import tqdm

    convert = partial(CONVERTERS[fmt], **options) if options else CONVERTERS[fmt]
    image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(os.path.basename(path))[0])
    read, skipped, examples = 0, Counter(), defaultdict(list)
    writer = ShardWriter(out, max_count=shard_size)
    try:
        for where, src in tqdm(read_source(path), desc=f"{fmt} {os.path.basename(path)}", unit="record",
                               disable=not progress, dynamic_ncols=True):
            read += 1
            try:
                if isinstance(src, BadRecord):
                    raise src
                if not isinstance(src, dict):
                    raise BadRecord("wrong_type", f"a record must be a JSON object, got {type(src).__name__}")
                record, paths = convert(src, image_root, f"{stem}-{read - 1:09d}")
                check_record(record, len(paths))
                ext, images = load_images(paths)
            except BadRecord as e:
                if not skip_bad:
                    raise ConvertError(f"{where}: {e.reason}: {e} (--skip-bad skips and counts such records)") from e
                skipped[e.reason] += 1
                if len(examples[e.reason]) < EXAMPLES_PER_REASON:
                    examples[e.reason].append(f"{where}: {e}")
                continue
            writer.image_format = ext  # keep each record's image bytes under their own extension
            writer.write(record, images)
    except BaseException:
        writer.close()
        for shard in writer.paths:  # a failed run leaves nothing that looks complete
            if os.path.exists(shard):
                os.remove(shard)
        raise
    writer.close()
    summary = {"format": fmt, "source": path, "read": read, "written": writer.total, "skipped": dict(skipped),
               "examples": dict(examples), "shards": writer.paths}
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, fn in CONVERTERS.items():
        s = sub.add_parser(name, help=fn.__doc__.split("\n")[0], description=fn.__doc__.split("\n")[0])
        s.add_argument("--in", dest="source", required=True, help="the source file: a JSON array or JSON lines")
        s.add_argument("--out", required=True, help="output shard pattern, e.g. data/x/train-%%06d.tar")
        s.add_argument("--image-root", default=None, help="folder the image paths are relative to "
                       "(default: the source file's folder)")
        s.add_argument("--shard-size", type=int, default=1000, help="records per shard")
        s.add_argument("--skip-bad", action="store_true", help="skip bad records and count them, instead of stopping")
        s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        if name == "mllm-dpo":
            s.add_argument("--ref-model", default=MLLM_DPO_REF_MODEL, help="name stored as ref_logps.model")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    options = {"ref_model": args.ref_model} if args.format == "mllm-dpo" else {}
    return convert_file(args.format, args.source, args.out, args.image_root, args.shard_size, args.skip_bad,
                        args.progress, **options)


if __name__ == "__main__":
    try:
        main()
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
