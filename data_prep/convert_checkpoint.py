"""Convert a checkpoint in the original LLaVA repository layout (what SeVa, SIMA and mllm-dpo publish) into the
transformers LLaVA layout that ``backbone.checkpoint`` loads. Offline, on the CPU; nothing is downloaded.

    # a full original-layout LLaVA (LlavaLlamaForCausalLM, model_type llava_llama)
    python data_prep/convert_checkpoint.py --model /models/llava-v1.5-7b --vision /models/clip-vit-large-patch14-336 \\
        --out /models/llava-v1.5-7b-converted
    # a LoRA checkpoint: its base (a plain Llama/Vicuna, or an original-layout LLaVA) + the adapter directory
    # (adapter_config.json, adapter_model.{safetensors,bin}, non_lora_trainables.bin with the projector, config.json)
    python data_prep/convert_checkpoint.py --model /models/vicuna-7b-v1.5 --lora /models/llava-v1.5-7b-lora \\
        --vision /models/clip-vit-large-patch14-336 --out /models/llava-v1.5-7b-lora-merged

Then train or evaluate it with ``--model.init_args.backbone.checkpoint /models/...-converted``.

What the original layout holds, and where it goes (transformers 5 names; the key mapping of transformers'
``convert_llava_weights_to_hf.py``, written to the current module tree)::

    model.embed_tokens / model.layers.* / model.norm    -> model.language_model.*
    lm_head.weight (absent when tied: embed_tokens)      -> lm_head.weight
    model.mm_projector.0.* / model.mm_projector.2.*      -> model.multi_modal_projector.linear_1.* / linear_2.*
    model.vision_tower.vision_tower.vision_model.*       -> model.vision_tower.vision_model.*
    (usually absent: the tower is then read from --vision, a local CLIP checkpoint, CLIPVisionModel or CLIPModel)

``config.json`` gives the Llama text config and the multimodal fields: ``mm_projector_type`` (only
``mlp2x_gelu``, the LLaVA-1.5 projector, has a transformers equivalent), ``mm_hidden_size`` (must be the tower's
width), ``mm_vision_select_layer`` -> ``vision_feature_layer``, ``mm_vision_select_feature`` (``patch`` ->
strategy ``default``, ``cls_patch`` -> ``full``). LLaVA-NeXT (``image_aspect_ratio: anyres``,
``mm_patch_merge_type: spatial*``) and other families (``llava_mistral``, ``llava_mpt``, ...) are refused.

LoRA. peft adapters (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``) are MERGED into the base:
``W' = W + (alpha / r) B A`` (``alpha / sqrt(r)`` with ``use_rslora``; per-module ``alpha_pattern`` honoured),
computed in float32. The result is a plain LLaVA: ``backbone.checkpoint`` loads it, a new ``backbone.lora``
trains further on top of it, and the frozen reference of DPO/PPO is exactly the released model (writing the
adapter beside instead would need its base converted anyway and peft's key names rewritten to the transformers
module tree). ``non_lora_trainables.bin`` (the projector, trained without LoRA) replaces the base's weights.

Tokenizer and vocabulary. The checkpoint's own tokenizer (``--tokenizer``, else the adapter's directory, else the
model's) gets the ``<image>`` token and, if it has none, a ``<pad>`` token, as transformers' converter does. The
embedding and ``lm_head`` rows then grow to ``len(tokenizer)`` rounded up to ``--pad-vocab-to`` (64, as the
``llava-hf`` checkpoints: 32000 -> 32064; 1 keeps the exact size); each new row is the mean of the original rows
(deterministic; transformers samples around that mean with covariance 1e-5 Sigma; ``<image>`` rows are never read,
as image features replace them). The processor is the CLIP image processor of ``--vision`` (its
``preprocessor_config.json``, else CLIP's defaults at the tower's size), this tokenizer and LLaVA-1.5's chat
template (``USER: <image>\\n... ASSISTANT:``). The original repository pads images to a square with the mean colour
(``image_aspect_ratio: pad``); CLIP's processor resizes the short side and centre-crops, as ``llava-hf`` does.

Weights are read with safetensors or ``torch.load(weights_only=True)`` only (sharded ``*.bin`` / ``*.safetensors``
with or without an index json). The output directory is written atomically (complete or absent) with the legacy
processor files 4.x loaders need (``backbone.save_processor``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from vlalign.backbone import (DTYPES, clip_image_processor, llava_processor, check_llava_checkpoint,  # noqa: E402
                              save_llava, save_processor)
from vlalign.checkpoint import atomic_dir  # noqa: E402
from vlalign.data.chat import LLAVA_CHAT_TEMPLATE  # noqa: E402

# Text-config fields of an original-layout config.json that belong to the Llama config (the rest is LLaVA's).
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "attention_bias", "mlp_bias", "head_dim", "bos_token_id", "eos_token_id",
                "initializer_range", "attention_dropout")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# Files of a checkpoint directory that are not its weights.
NOT_WEIGHTS = ("non_lora_trainables", "adapter_model", "training_args", "optimizer", "scheduler", "rng_state")


# ------------------------------------------------------------------------------------------------- reading
def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_file(path: str) -> dict[str, torch.Tensor]:
    """One weights file: ``*.safetensors`` through safetensors, anything else through ``torch.load(weights_only=True)``
    (tensors only: a file that needs unpickling of code is refused by torch)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's UnpicklingError and friends: name the file
        raise ValueError(f"{path}: not loadable as plain tensors with torch.load(weights_only=True) ({e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return sd


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory: the shards its index json names, else every ``*.safetensors``, else
    every ``*.bin`` (adapter, projector and trainer files excluded)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(directory, index)
        if os.path.isfile(path):
            files = sorted(set(read_json(path)["weight_map"].values()))
            break
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors"))) or \
            sorted(glob.glob(os.path.join(directory, "*.bin")))
        files = [os.path.basename(f) for f in files if not os.path.basename(f).startswith(NOT_WEIGHTS)]
    if not files:
        raise FileNotFoundError(f"{directory}: no weights (*.safetensors or pytorch_model*.bin)")
    out = {}
    for name in files:
        out.update(load_file(os.path.join(directory, name)))
    return out


def _first_file(directory: str, names: tuple[str, ...]) -> Optional[str]:
    return next((os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))), None)


# ------------------------------------------------------------------------------------------------- config
def llava_fields(config: dict, where: str) -> dict:
    """The multimodal settings of an original-layout ``config.json``; refuses what transformers' LLaVA cannot
    express, naming the key."""
    model_type = config.get("model_type")
    if model_type != "llava_llama":
        raise ValueError(f"{where}: model_type {model_type!r}: this converter reads the original LLaVA repository's "
                         "llava_llama checkpoints (LlavaLlamaForCausalLM)")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(f"{where}: mm_projector_type {projector!r} has no transformers LLaVA equivalent (its "
                         "projector is linear -> GELU -> linear, 'mlp2x_gelu')")
    if config.get("image_aspect_ratio") == "anyres" or str(config.get("mm_patch_merge_type", "flat")) != "flat":
        raise ValueError(f"{where}: a LLaVA-NeXT checkpoint (image_aspect_ratio "
                         f"{config.get('image_aspect_ratio')!r}, mm_patch_merge_type "
                         f"{config.get('mm_patch_merge_type')!r}): any-resolution tiles are not supported")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise ValueError(f"{where}: mm_vision_select_feature {feature!r} must be one of {sorted(SELECT_FEATURE)}")
    for key in ("mm_hidden_size", "mm_vision_select_layer"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"{where}: {key} missing or not an integer ({config.get(key)!r})")
    if config.get("mm_use_im_start_end"):
        raise ValueError(f"{where}: mm_use_im_start_end true (<im_start>/<im_end> around the image) is not supported")
    return {"vision_feature_layer": config["mm_vision_select_layer"], "mm_hidden_size": config["mm_hidden_size"],
            "vision_feature_select_strategy": SELECT_FEATURE[feature],
            "mm_vision_tower": config.get("mm_vision_tower")}


def text_config(config: dict):
    """The Llama config of an original-layout ``config.json`` (its Llama fields; LLaVA's are dropped)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{k: config[k] for k in LLAMA_FIELDS if config.get(k) is not None}, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------- LoRA
def _strip_peft(key: str) -> str:
    """``base_model.model.model.layers.0...`` -> ``model.layers.0...`` (peft's wrapper prefixes)."""
    key = key.removeprefix("base_model.model.").removeprefix("base_model.")
    return key[len("model."):] if key.startswith("model.model.") else key


def _alpha(adapter: dict, module: str, default: float) -> float:
    """peft's ``alpha_pattern``: a key that is the module's name or a regex matching its dotted suffix."""
    for pattern, alpha in (adapter.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return float(alpha)
    return default


def merge_lora(weights: dict[str, torch.Tensor], lora_dir: str) -> int:
    """Merge a peft LoRA adapter into ``weights`` (original-layout keys) in place: ``W += scale * B @ A`` with
    ``scale = alpha / r`` (``alpha / sqrt(r)`` under rsLoRA), B: (out, r), A: (r, in). Non-LoRA tensors saved in the
    adapter (peft's ``modules_to_save``) replace the base's. Returns the number of merged matrices."""
    cfg_path = os.path.join(lora_dir, "adapter_config.json")
    adapter = read_json(cfg_path)
    if adapter.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {adapter.get('peft_type')!r}; only LORA adapters merge")
    for key in ("use_dora", "fan_in_fan_out"):
        if adapter.get(key):
            raise ValueError(f"{cfg_path}: {key} true is not supported")
    path = _first_file(lora_dir, ("adapter_model.safetensors", "adapter_model.bin"))
    if path is None:
        raise FileNotFoundError(f"{lora_dir}: no adapter_model.safetensors or adapter_model.bin")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        key = _strip_peft(key)
        m = re.fullmatch(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight", key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = value
        elif "lora_" in key:
            raise ValueError(f"{path}: {key}: only LoRA on linear layers is supported (lora_A / lora_B weights)")
        else:
            target = key.replace(".modules_to_save", "").replace(".default.", ".")
            if target not in weights:
                raise KeyError(f"{path}: {key} has no counterpart {target!r} in the base weights")
            weights[target] = value
    r_default, alpha_default = adapter.get("r", 8), float(adapter.get("lora_alpha", 8))
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        target = f"{module}.weight"
        if target not in weights:
            raise KeyError(f"{path}: LoRA on {module}, but the base has no {target!r}")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0] or r_default
        alpha = _alpha(adapter, module, alpha_default)
        scale = alpha / math.sqrt(r) if adapter.get("use_rslora") else alpha / r
        w = weights[target]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"{path}: {module}: B @ A is {(b.shape[0], a.shape[1])}, the weight is {tuple(w.shape)}")
        weights[target] = (w.float() + scale * (b @ a)).to(w.dtype)
    return len(pairs)


def load_non_lora(lora_dir: str) -> dict[str, torch.Tensor]:
    """``non_lora_trainables.bin`` (LLaVA's LoRA runs save the projector there), with original-layout keys."""
    path = _first_file(lora_dir, ("non_lora_trainables.safetensors", "non_lora_trainables.bin"))
    return {} if path is None else {_strip_peft(k): v for k, v in load_file(path).items()}


# ------------------------------------------------------------------------------------------------- mapping
def to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout keys -> ``LlavaForConditionalGeneration`` keys (transformers 5). Raises on an unknown key.

    A stored tower's ``vision_model.`` level is dropped here (5.x's CLIPVisionModel has none); ``convert`` puts
    it back for a transformers whose CLIP still has it."""
    out = {}
    for key, value in weights.items():
        if key.endswith(("rotary_emb.inv_freq", "position_ids")):
            continue
        if key.startswith("model.mm_projector."):
            m = re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", key)
            if not m:
                raise KeyError(f"{key}: unexpected projector weight (mlp2x_gelu has layers 0 and 2)")
            new = f"model.multi_modal_projector.linear_{1 if m[1] == '0' else 2}.{m[2]}"
        elif key.startswith("model.vision_tower.vision_tower."):  # LLaVA's CLIPVisionTower wraps a CLIPVisionModel
            new = "model.vision_tower." + key[len("model.vision_tower.vision_tower."):].removeprefix("vision_model.")
        elif key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
            new = "model.language_model." + key[len("model."):]
        elif key == "lm_head.weight":
            new = key
        else:
            raise KeyError(f"{key}: not a weight of the original LLaVA layout (llava_llama) this converter knows")
        out[new] = value
    return out


def vision_weights(vision_dir: str) -> dict[str, torch.Tensor]:
    """The CLIP vision tower of a local CLIPVisionModel / CLIPModel checkpoint, as ``model.vision_tower.*`` keys
    (read by transformers' own loader, which knows both layouts and their key prefixes)."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(vision_dir, local_files_only=True, dtype=torch.float32)
    return {"model.vision_tower." + k: v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}


def grow_vocab(weights: dict[str, torch.Tensor], n: int):
    """Grow ``embed_tokens`` and ``lm_head`` to ``n`` rows; each new row is the mean of the original rows."""
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        w = weights[key]
        if w.shape[0] < n:
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            weights[key] = torch.cat([w, mean.expand(n - w.shape[0], -1)])


def prepare_tokenizer(tokenizer_dir: str):
    """The checkpoint's tokenizer with ``<image>`` (special) and a pad token (``<pad>``, when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.image_token = "<image>"
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


# ------------------------------------------------------------------------------------------------- convert
def convert(model_dir: str, out: str, vision_dir: Optional[str] = None, lora_dir: Optional[str] = None,
            tokenizer_dir: Optional[str] = None, pad_vocab_to: int = 64, dtype: Optional[str] = None) -> dict:
    """Convert (see the module docstring); returns a summary (counts, sizes) for the log."""
    from transformers import (AutoImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration)

    model_config = read_json(os.path.join(model_dir, "config.json"))
    llava_config_dir = lora_dir if lora_dir and os.path.isfile(os.path.join(lora_dir, "config.json")) else model_dir
    config = read_json(os.path.join(llava_config_dir, "config.json"))
    fields = llava_fields(config, os.path.join(llava_config_dir, "config.json"))
    if vision_dir is None:
        tower = fields["mm_vision_tower"]
        if not (tower and os.path.isdir(tower)):
            raise ValueError(f"--vision is required: mm_vision_tower {tower!r} is not a local directory (give a local "
                             "copy of that CLIP checkpoint)")
        vision_dir = tower
    vision = CLIPVisionConfig.from_pretrained(vision_dir, local_files_only=True)
    if vision.hidden_size != fields["mm_hidden_size"]:
        raise ValueError(f"--vision {vision_dir}: hidden size {vision.hidden_size}, but mm_hidden_size is "
                         f"{fields['mm_hidden_size']} ({fields['mm_vision_tower']!r} expected)")

    weights = load_weights(model_dir)
    if "lm_head.weight" not in weights:  # tied embeddings: LLaVA's lm_head is its own matrix
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    merged = merge_lora(weights, lora_dir) if lora_dir else 0
    non_lora = load_non_lora(lora_dir) if lora_dir else {}
    weights.update(non_lora)
    weights = to_transformers(weights)
    stored_tower = any(k.startswith("model.vision_tower.") for k in weights)
    if not stored_tower:
        weights.update(vision_weights(vision_dir))
    if "model.multi_modal_projector.linear_1.weight" not in weights:
        raise KeyError(f"no model.mm_projector.* weights in {model_dir}"
                       + (f" or {lora_dir}/non_lora_trainables.bin" if lora_dir else ""))

    tok = prepare_tokenizer(tokenizer_dir or (lora_dir if lora_dir and os.path.isfile(
        os.path.join(lora_dir, "tokenizer_config.json")) else model_dir))
    rows = weights["model.language_model.embed_tokens.weight"].shape[0]
    n = max(rows, -(-len(tok) // pad_vocab_to) * pad_vocab_to)
    grow_vocab(weights, n)

    text = text_config(config if "hidden_size" in config else model_config)
    text.vocab_size = n
    text.pad_token_id = tok.pad_token_id
    text.bos_token_id, text.eos_token_id = tok.bos_token_id, tok.eos_token_id
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                        vision_feature_layer=fields["vision_feature_layer"],
                        vision_feature_select_strategy=fields["vision_feature_select_strategy"],
                        image_seq_length=(vision.image_size // vision.patch_size) ** 2, tie_word_embeddings=False)
    dtype = dtype or str(config.get("torch_dtype") or config.get("dtype") or "float32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {' | '.join(DTYPES)}, got {dtype!r}")
    weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava)
    expected = set(model.state_dict())
    if any(k.startswith("model.vision_tower.vision_model.") for k in expected):  # a CLIP with the vision_model level
        weights = {("model.vision_tower.vision_model." + k[len("model.vision_tower."):]
                    if k.startswith("model.vision_tower.") and not k.startswith("model.vision_tower.vision_model.")
                    else k): v for k, v in weights.items()}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise KeyError(f"the converted weights do not fit a LlavaForConditionalGeneration: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    model.load_state_dict(weights, strict=True, assign=True)
    model.config.dtype = DTYPES[dtype]

    try:
        image_processor = AutoImageProcessor.from_pretrained(vision_dir, local_files_only=True)
    except (OSError, ValueError):
        image_processor = clip_image_processor(vision.image_size)
    processor = llava_processor(tok, image_processor, vision.patch_size, LLAVA_CHAT_TEMPLATE)
    with atomic_dir(out) as tmp:
        save_llava(model, tmp)
        save_processor(processor, tmp)
    check_llava_checkpoint(out, "--out")
    return {"lora_merged": merged, "non_lora_trainables": len(non_lora), "tower_from": "checkpoint" if stored_tower
            else vision_dir, "vocab": f"{rows} -> {n} (tokenizer {len(tok)})", "dtype": dtype}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="original-layout LLaVA directory (config.json model_type "
                    "llava_llama, weights); for a LoRA checkpoint, its base model")
    ap.add_argument("--lora", help="peft LoRA adapter directory (adapter_config.json, adapter_model.*, optional "
                    "non_lora_trainables.bin and the llava_llama config.json); merged into the base")
    ap.add_argument("--vision", help="local CLIP checkpoint (CLIPVisionModel or CLIPModel) named by mm_vision_tower; "
                    "default: mm_vision_tower when it is a local directory")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the adapter's, else the model's)")
    ap.add_argument("--out", required=True, help="output directory (transformers LLaVA layout)")
    ap.add_argument("--pad-vocab-to", type=int, default=64, help="round the vocabulary up to a multiple of this "
                    "(64 as llava-hf; 1: exact)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the checkpoint's torch_dtype)")
    args = ap.parse_args(argv)
    if args.pad_vocab_to < 1:
        ap.error("--pad-vocab-to must be >= 1")
    summary = convert(args.model, args.out, vision_dir=args.vision, lora_dir=args.lora, tokenizer_dir=args.tokenizer,
                      pad_vocab_to=args.pad_vocab_to, dtype=args.dtype)
    print(f"converted to {args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
