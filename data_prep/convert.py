"""Convert the preference / SFT / prompt files of LLaVA, the seed systems, TRL, RLAIF-V, LLaMA-Factory and ms-swift
into our shards (``vlalign.data.schema``).

    python data_prep/convert.py FORMAT --in FILE --out "data/NAME/train-%06d.tar" [--image-root DIR] \
        [--shard-size 1000 --skip-bad --no-progress]

    python data_prep/convert.py llava-sft --in llava_v1_5_mix665k.json --image-root /data --out data/sft/train-%06d.tar
    python data_prep/convert.py seva --in merged_answer_file_8k_diffusion_step500.json \
        --image-root /data/ocrvqa/images --out data/seva/train-%06d.tar
    python data_prep/convert.py mllm-dpo --in dpo_logp.json --image-root /data/lrv --out data/mllm/train-%06d.tar \
        --ref-model llava-v1.5-13b

FILE is a JSON array or JSON lines (one object per line), told apart by its first character; with ``pyarrow``
installed (an optional dependency, not installed by the project) also a parquet file (``.parquet``), a folder of
parquet files, or a folder written by ``datasets``' ``save_to_disk`` (one split: the folder with ``state.json``).
Image paths in it are relative to ``--image-root`` (default: FILE's directory); images may also be embedded, as the
Hub's parquet files and ``datasets`` store them: ``{"bytes": ..., "path": ...}`` (bytes, or base64 text in JSON;
``path`` is used when ``bytes`` is null). Runs on one CPU; for a huge file, split it and run one process per part
with its own ``--out``. Formats (one function each below, ``CONVERTERS``):

    llava-sft   LLaVA: {"id", "image"?, "conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
                -> sft; "image" may be a path, a list of paths, or Vision-LLM-Alignment's comma-joined paths
                ("a.jpg,b.jpg", whose single <image> then stands for all of them); no image: text-only.
    preference  TRL's preference layouts (alias ``trl``) -> preference. Standard: {"id"?, "prompt", "chosen",
                "rejected", "images": [paths] | "image": path, "candidates"?, "scores"?, "meta"?}; the prompt is
                a string or a list of turns ({"role", "content"} or {"from", "value"}); "candidates" (ranked, best
                first) and "scores" (one object per candidate) are kept, chosen/rejected then default to the
                first/last candidate. Conversational: prompt / chosen / rejected are lists of messages whose
                content may be typed parts ([{"type": "image"}, {"type": "text", "text": ...}], an image part
                becoming an <image> placeholder); without "prompt", chosen and rejected are whole conversations
                sharing their turns before the last (TRL's implicit prompt).
    rlaif-v     openbmb/RLAIF-V-Dataset: {"image": {"bytes", "path"}, "question", "chosen", "rejected", "ds_name",
                "origin_dataset", "origin_split", "idx", "image_path"} -> preference; the other columns go to meta.
    llamafactory-dpo   LLaMA-Factory's sharegpt preference data: {"conversations": [turns ending with a human
                turn], "chosen": {"from": "gpt", "value"}, "rejected": {...}, "images": [paths], "system"?}
                -> preference (turns may also be {"role", "content"}, under "messages").
    llamafactory-sft   LLaMA-Factory's multimodal SFT data (mllm_demo.json): {"messages": [{"role", "content"},
                ...], "images": [paths], "system"?} -> sft (also "conversations" with {"from", "value"}).
    swift       ms-swift's RLHF data: {"messages": [system?, user, assistant, ...], "rejected_response",
                "images": [paths]} -> preference: chosen is the last assistant message (also "rejected_messages",
                a whole rejected conversation, in place of "rejected_response").
    seva        SeVa's step-3 pairs: {"chosen", "reject", "question", "image_id"} -> preference; the image is
                image_root/image_id, or image_root/image_id + ".jpg" (SeVa's TextVQA ids have no suffix).
    seva-prompts  SeVa's step-1 image-question list ({"image", "text"} per line) -> prompt, for
                ``data_prep/seva_pairs.py``.
    sima        SIMA's dataset_for_dpo.py: {"id", "image", "conversations", "rejected_conversations"} -> preference;
                prompt = the turns before the last gpt turn (the same in both), chosen / rejected = that last gpt
                turn of conversations / rejected_conversations.
    sima-prompts  SIMA's question file ({"image", "text", "ground_truth", "question_id"?}) -> prompt with the
                ground truth as "answer", for ``data_prep/sima_pairs.py``.
    vla-ranked  Vision-LLM-Alignment's RM/DPO data: LLaVA {"id", "image", "conversations"} whose last gpt "value"
                is a list of k >= 2 responses ranked best to worst -> preference with "candidates".
    mllm-dpo    mllm-dpo's DPO file with reference log-probs -> preference with "ref_logps" (see below).
    unpaired    TRL's unpaired layout for KTO: {"id"?, "prompt", "completion", "label": true|false,
                "images": [paths] | "image": path} -> unpaired (label true: desirable).

Every converted record is normalised the same way (``normalise``): responses (chosen, rejected, candidates,
completions, answers, assistant turns) lose their surrounding whitespace, so TRL's leading-space convention
(``" blue."``) does not become an extra space token; and a turn whose ``<image>`` placeholders sit between pieces of
text (Vision-LLM-Alignment's "...doing?\n<image>\n\n### Answer:...") gets its placeholders moved to its start
(LLaVA's layout, where LLaVA-1.5's template renders images anyway) and its text pieces joined with the newlines
that surrounded them, where the template would otherwise glue them ("doing?### Answer:"). Different images for
the chosen and the rejected side (ms-swift's "rejected_images", mDPO-style pairs) are not supported: such a
record is refused (``unsupported``).

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
import base64
import binascii
import glob
import io
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from PIL import Image, UnidentifiedImageError

from vlalign.data.schema import IMAGE_TOKEN, RecordError, check_json_value, parse_record, with_images
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


ImageSource = Union[str, bytes]  # a path to an image file, or the image file's bytes (embedded in the source)
Converted = tuple[dict, list[ImageSource]]  # (schema record as JSON, its images in order)


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


def _content(value: Any, where: str) -> str:
    """A message's content as text: a string, or typed parts ([{"type": "image"}, {"type": "text", "text"}], as TRL's
    conversational layout and the chat templates have them) joined with newlines, each image part an ``<image>``."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise BadRecord("wrong_type", f"'{where}' text must be a string or a list of typed parts, got "
                        f"{type(value).__name__}")
    pieces = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_TOKEN)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise BadRecord("wrong_type", f"'{where}[{i}]' must be {{'type': 'image'}} or {{'type': 'text', 'text': "
                            f"str}}, got {part!r:.80}")
    return "\n".join(pieces)


def _turns(value: Any, key: str) -> list[dict]:
    """A prompt or conversation as schema turns, from a string, {"role", "content"} (content a string or typed
    parts) or LLaVA {"from", "value"}."""
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
        turns.append({"role": role, "content": _content(content, f"{key}[{i}]")})
    return turns


def _answer(value: Any, key: str) -> str:
    """A response given as a string, one assistant turn, or a list holding one assistant message."""
    if value is None:
        raise BadRecord("missing_field", f"'{key}' is missing")
    if isinstance(value, str):
        return value
    turns = _turns([value] if isinstance(value, dict) else value, key)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise BadRecord("wrong_type", f"'{key}' must be a string or one assistant (gpt) turn")
    return turns[0]["content"]


def _split_last_answer(turns: list[dict], key: str) -> tuple[list[dict], str]:
    """``(prompt turns, final answer)`` of a conversation that ends with an assistant turn."""
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise BadRecord("wrong_type", f"'{key}' must end with a gpt turn after a human turn")
    return turns[:-1], turns[-1]["content"]


def _image(value: Any, image_root: str, key: str) -> list[ImageSource]:
    """One entry of an image field: a path (Vision-LLM-Alignment's "a.jpg,b.jpg" is split when no file has the
    joined name), or ``{"bytes", "path"}`` as ``datasets`` stores an image (bytes, or base64 text in JSON)."""
    if isinstance(value, str) and value:
        path = os.path.join(image_root, value)
        if "," in value and not os.path.exists(path):
            return [os.path.join(image_root, v.strip()) for v in value.split(",") if v.strip()]
        return [path]
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray, memoryview)):
            return [bytes(data)]
        if isinstance(data, str):
            try:
                return [base64.b64decode(data, validate=True)]
            except (binascii.Error, ValueError) as e:
                raise BadRecord("bad_image", f"'{key}' bytes are neither bytes nor base64 text ({e})") from e
        if data is None and isinstance(path, str) and path:
            return [os.path.join(image_root, path)]
    raise BadRecord("wrong_type", f"'{key}' must be a path, a list of paths or {{'bytes', 'path'}} objects, got "
                    f"{type(value).__name__}")


def _images(src: dict, image_root: str, keys: Sequence[str] = ("images", "image")) -> list[ImageSource]:
    """The record's images from the first of ``keys`` it has: none, one entry or a list of entries (``_image``)."""
    key = next((k for k in keys if k in src), keys[0])
    value = src.get(key)
    if value is None:
        return []
    out = []
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        out += _image(v, image_root, f"{key}[{i}]" if isinstance(value, list) else key)
    return out


def _one_placeholder_for_all(turns: list[dict], n_images: int) -> list[dict]:
    """Vision-LLM-Alignment's multi-image samples keep LLaVA's single ``<image>`` for all their images: expand it."""
    if n_images < 2 or sum(t["content"].count(IMAGE_TOKEN) for t in turns) != 1:
        return turns
    expanded = "\n".join([IMAGE_TOKEN] * n_images)
    return [{**t, "content": t["content"].replace(IMAGE_TOKEN, expanded)} for t in turns]


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
    images = _images(src, image_root)
    record = {"kind": "sft", "id": _id(src, default_id), "conversation": _one_placeholder_for_all(conversation,
                                                                                                  len(images)),
              "meta": {"source": "llava"}}
    return record, images


def _implicit_prompt(src: dict) -> tuple[list[dict], str, str]:
    """TRL's implicit prompt: chosen and rejected are whole conversations that share every turn before the last."""
    prompt, chosen = _split_last_answer(_turns(_get(src, "chosen", list, "a conversation"), "chosen"), "chosen")
    rprompt, rejected = _split_last_answer(_turns(_get(src, "rejected", list, "a conversation"), "rejected"),
                                           "rejected")
    if rprompt != prompt:
        raise BadRecord("prompt_mismatch", "'rejected' asks something else than 'chosen' (no 'prompt' given)")
    return prompt, chosen, rejected


def preference(src: dict, image_root: str, default_id: str) -> Converted:
    """TRL's standard or conversational preference layout -> preference record (candidates, scores, meta kept)."""
    extra: dict = {}
    cands = src.get("candidates")
    if cands is not None:
        if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) for c in cands):
            raise BadRecord("wrong_type", "'candidates' must be a list of at least 2 strings, best first")
        extra["candidates"] = cands
    if src.get("scores") is not None:
        extra["scores"] = _get(src, "scores", list, "a list of objects, one per candidate")
    if "prompt" not in src:
        if cands is not None or not isinstance(src.get("chosen"), list):
            raise BadRecord("missing_field", "'prompt' is missing")
        prompt, chosen, rejected = _implicit_prompt(src)
    else:
        prompt = _turns(src["prompt"], "prompt")
        chosen = _answer(src.get("chosen"), "chosen") if cands is None or "chosen" in src else cands[0]
        rejected = _answer(src.get("rejected"), "rejected") if cands is None or "rejected" in src else cands[-1]
    record = _preference(_id(src, default_id), prompt, chosen, rejected, "preference", **extra)
    if src.get("meta") is not None:
        record["meta"] = {**_get(src, "meta", dict, "an object"), **record["meta"]}
    return record, _images(src, image_root)


def _json_safe(value: Any) -> bool:
    """True for what a record's meta may carry as is (strings, numbers, booleans, null, lists/objects of them)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_json_safe(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_safe(v) for k, v in value.items())
    return False


def rlaif_v(src: dict, image_root: str, default_id: str) -> Converted:
    """RLAIF-V's {"image", "question", "chosen", "rejected", ...} -> preference record (other columns in meta)."""
    prompt = [{"role": "user", "content": _text(src, "question")}]
    rid = src.get("id")
    if rid is None and isinstance(src.get("idx"), (str, int)) and not isinstance(src.get("idx"), bool):
        rid = f"{src['ds_name']}-{src['idx']}" if isinstance(src.get("ds_name"), str) else src["idx"]
    record = _preference(_id({"id": rid}, default_id), prompt, _answer(src.get("chosen"), "chosen"),
                         _answer(src.get("rejected"), "rejected"), "rlaif-v")
    meta = {k: v for k, v in src.items() if k not in ("image", "question", "chosen", "rejected") and _json_safe(v)}
    record["meta"] = {**meta, **record["meta"]}
    images = _images(src, image_root, ("image",))
    if not images and isinstance(src.get("image_path"), str):  # a copy without the image column
        images = _image(src["image_path"], image_root, "image_path")
    return record, images


def _system(src: dict, turns: list[dict]) -> list[dict]:
    """The turns with the record's "system" column (LLaMA-Factory, ms-swift) as a leading system turn."""
    system = src.get("system")
    if system is None or (turns and turns[0]["role"] == "system"):
        return turns
    if not isinstance(system, str):
        raise BadRecord("wrong_type", f"'system' must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}] + turns if system.strip() else turns


def _messages(src: dict, keys: Sequence[str]) -> list[dict]:
    key = next((k for k in keys if src.get(k) is not None), keys[0])
    return _system(src, _turns(_get(src, key, list, "a list of turns"), key))


def llamafactory_dpo(src: dict, image_root: str, default_id: str) -> Converted:
    """LLaMA-Factory's sharegpt preference record (conversations + chosen / rejected turns) -> preference record."""
    prompt = _messages(src, ("conversations", "messages"))
    record = _preference(_id(src, default_id), prompt, _answer(src.get("chosen"), "chosen"),
                         _answer(src.get("rejected"), "rejected"), "llamafactory")
    return record, _images(src, image_root)


def llamafactory_sft(src: dict, image_root: str, default_id: str) -> Converted:
    """LLaMA-Factory's multimodal SFT record (messages + images, as mllm_demo.json) -> sft record."""
    record = {"kind": "sft", "id": _id(src, default_id), "conversation": _messages(src, ("messages", "conversations")),
              "meta": {"source": "llamafactory"}}
    return record, _images(src, image_root)


def swift(src: dict, image_root: str, default_id: str) -> Converted:
    """ms-swift's RLHF record (messages + rejected_response | rejected_messages, images) -> preference record."""
    prompt, chosen = _split_last_answer(_messages(src, ("messages",)), "messages")
    if src.get("rejected_response") is not None:
        rejected = _answer(src["rejected_response"], "rejected_response")
    elif src.get("rejected_messages") is not None:
        rprompt, rejected = _split_last_answer(_messages(src, ("rejected_messages",)), "rejected_messages")
        if rprompt != prompt:
            raise BadRecord("prompt_mismatch", "'rejected_messages' asks something else than 'messages'")
    else:
        raise BadRecord("missing_field", "'rejected_response' (or 'rejected_messages') is missing")
    images = _images(src, image_root)
    if src.get("rejected_images") is not None and _images(src, image_root, ("rejected_images",)) != images:
        raise BadRecord("unsupported", "'rejected_images' differ from 'images': pairs with different images for "
                        "the chosen and the rejected side are not supported")
    return _preference(_id(src, default_id), prompt, chosen, rejected, "ms-swift"), images


def _prompt_record(src: dict, image_root: str, default_id: str, source: str, answer_key: Optional[str]) -> Converted:
    rid = src.get("id", src.get("question_id"))
    record = {"kind": "prompt", "id": _id({"id": rid}, default_id),
              "prompt": [{"role": "user", "content": _text(src, "text")}], "meta": {"source": source}}
    if answer_key is not None:
        record["answer"] = _text(src, answer_key)
    return record, _images(src, image_root)


def seva_prompts(src: dict, image_root: str, default_id: str) -> Converted:
    """SeVa's step-1 image-question list ({"image", "text"}) -> prompt record."""
    return _prompt_record(src, image_root, default_id, "seva", None)


def sima_prompts(src: dict, image_root: str, default_id: str) -> Converted:
    """SIMA's question file ({"image", "text", "ground_truth"}) -> prompt record with the ground truth as answer."""
    return _prompt_record(src, image_root, default_id, "sima", "ground_truth")


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
    return _preference(_id(src, default_id), prompt, chosen, rejected, "sima"), _images(src, image_root)


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
    images = _images(src, image_root)
    record = _preference(_id(src, default_id), _one_placeholder_for_all(prompt, len(images)), cands[0], cands[-1],
                         "vision-llm-alignment", candidates=cands)
    return record, images


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
    return record, _images(src, image_root)


def unpaired(src: dict, image_root: str, default_id: str) -> Converted:
    """TRL's unpaired {"prompt", "completion", "label"} (standard or conversational) -> unpaired record (KTO)."""
    if "prompt" not in src:
        raise BadRecord("missing_field", "'prompt' is missing")
    label = src.get("label")
    if not isinstance(label, bool):
        raise BadRecord("wrong_type", f"'label' must be true (desirable) or false (undesirable), got {label!r:.40}")
    record = {"kind": "unpaired", "id": _id(src, default_id), "prompt": _turns(src["prompt"], "prompt"),
              "completion": _answer(src.get("completion"), "completion"), "label": label,
              "meta": {"source": "unpaired"}}
    return record, _images(src, image_root)


CONVERTERS: dict[str, Callable[..., Converted]] = {
    "llava-sft": llava_sft, "preference": preference, "trl": preference, "rlaif-v": rlaif_v,
    "llamafactory-dpo": llamafactory_dpo, "llamafactory-sft": llamafactory_sft, "swift": swift, "seva": seva,
    "seva-prompts": seva_prompts, "sima": sima, "sima-prompts": sima_prompts, "vla-ranked": vla_ranked,
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


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConvertError("reading parquet files and save_to_disk folders needs pyarrow, an optional dependency "
                           "(pip install pyarrow); or export the data as JSON lines") from None
    return pyarrow


def _arrow_files(path: str) -> tuple[str, list[str]]:
    """``("parquet" | "arrow", files)`` of a parquet file, a folder of parquet files, or a ``save_to_disk`` folder."""
    if os.path.isfile(path):
        return "parquet", [path]
    if not os.path.isdir(path):
        raise ConvertError(f"{path} not found")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise ConvertError(f"{path} holds the splits {splits} of a DatasetDict: give one split's folder, e.g. "
                           f"{os.path.join(path, splits[0] if splits else 'train')}")
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state) as f:
            files = [d["filename"] for d in json.load(f).get("_data_files", [])]
        return "arrow", [os.path.join(path, name) for name in files]
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if not files:
        raise ConvertError(f"{path} is a folder without parquet files or a save_to_disk state.json")
    return "parquet", files


def read_rows(path: str, batch_rows: int = 256) -> Iterator[tuple[str, Any]]:
    """``(where, row dict)`` of every row of parquet / ``save_to_disk`` data (``where``: ``file (row i)``), read a
    batch at a time; the columns of ``datasets``' Image feature come as ``{"bytes", "path"}``. Needs pyarrow."""
    pa = _pyarrow()
    kind, files = _arrow_files(path)
    for name in files:
        row = 0
        try:
            if kind == "parquet":
                batches = pa.parquet.ParquetFile(name).iter_batches(batch_size=batch_rows)
            else:  # datasets writes Arrow's streaming format; memory-mapped, read_all copies nothing
                batches = pa.ipc.open_stream(pa.memory_map(name, "r")).read_all().to_batches(batch_rows)
            for batch in batches:
                for obj in batch.to_pylist():
                    yield f"{name} (row {row})", obj
                    row += 1
        except (OSError, pa.ArrowException) as e:
            raise ConvertError(f"{name} (row {row}): cannot read it ({e})") from e


def read_source(path: str) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` for every record of a JSON array or JSON-lines file; ``where`` is ``file:line`` (plus
    ``(item i)`` in an array). A broken JSON line gives a ``BadRecord`` in place of its object. Parquet files and
    folders go to ``read_rows``."""
    if os.path.isdir(path) or path.endswith(".parquet"):
        yield from read_rows(path)
        return
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


def load_images(sources: Sequence[ImageSource]) -> tuple[str, list[bytes]]:
    """``(extension, [bytes])`` of the images (paths, or bytes embedded in the source), checked to decode; bytes
    unchanged when all share an allowed format, else every image re-encoded as PNG. Raises ``BadRecord``."""
    raw, formats = [], []
    for i, source in enumerate(sources):
        if isinstance(source, bytes):
            data, name = source, f"image {i} (embedded bytes)"
        else:
            name = f"image {source}"
            try:
                with open(source, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise BadRecord("missing_image", f"{name} not found") from None
            except OSError as e:
                raise BadRecord("missing_image", f"{name} cannot be read ({e})") from e
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                formats.append(im.format)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadRecord("bad_image", f"{name} cannot be decoded ({e})") from e
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


def images_first(text: str) -> str:
    """``text`` with its ``<image>`` placeholders moved to its start when they sit between pieces of text, the
    pieces joined by the newlines that surrounded the placeholders (the longest run; a space when there were none).

    "What is he doing?\n<image>\n\n### Answer:\nX" -> "<image>\nWhat is he doing?\n\n### Answer:\nX". LLaVA-1.5's
    template renders a turn's images first and then its text pieces with nothing between them ("doing?### Answer:");
    text with the placeholders only before or only after it is returned as it is.
    """
    pieces = text.split(IMAGE_TOKEN)
    if sum(1 for p in pieces if p.strip()) < 2:
        return text
    body, gap = "", []  # gap: the whitespace runs since the last piece of text
    for piece in pieces:
        if not piece.strip():
            gap.append(piece)
            continue
        stripped = piece.strip()
        start = piece.index(stripped[0])
        gap.append(piece[:start])
        if body:
            newlines = max(g.count("\n") for g in gap)
            body += "\n" * newlines if newlines else " "
        body += stripped
        gap = [piece[start + len(stripped):]]
    return (IMAGE_TOKEN + "\n") * (len(pieces) - 1) + body


def normalise(record: dict) -> dict:
    """The record with responses stripped of surrounding whitespace (TRL's " answer" would become a space token of
    its own) and ``images_first`` applied to every turn. Runs on every converter's output."""
    out = dict(record)
    for key in ("chosen", "rejected", "completion", "answer"):
        if isinstance(out.get(key), str):
            out[key] = out[key].strip()
    if isinstance(out.get("candidates"), list):
        out["candidates"] = [c.strip() if isinstance(c, str) else c for c in out["candidates"]]
    for key in ("prompt", "conversation"):
        if isinstance(out.get(key), list):
            out[key] = [{**t, "content": t["content"].strip() if t.get("role") == "assistant"
                         else images_first(t["content"])} if isinstance(t.get("content"), str) else t
                        for t in out[key]]
        elif isinstance(out.get(key), str):
            out[key] = images_first(out[key])
    return out


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
                record, sources = convert(src, image_root, f"{stem}-{read - 1:09d}")
                record = normalise(record)
                check_record(record, len(sources))
                ext, images = load_images(sources)
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
        s.add_argument("--in", dest="source", required=True, help="the source: a JSON array or JSON lines file; "
                       "with pyarrow also a .parquet file, a folder of them, or a save_to_disk folder")
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
