"""The shared LLaVA backbone: the only module that touches transformers' LLaVA classes and peft.

Every algorithm (SFT, reward model, DPO, PPO) holds a ``Backbone`` built from a ``BackboneConfig``:

* **load** a local checkpoint directory in the transformers LLaVA format (``checkpoint: /models/llava-1.5-7b-hf``);
* **compose** a new LLaVA from a CLIP vision checkpoint and a Llama-family language checkpoint with a fresh
  projector (``vision_checkpoint`` + ``language_checkpoint``; Vision-LLM-Alignment's way, SFT then trains the
  projector);
* or **build the embedded tiny default** offline (neither given): random init from ``TinySpec``, a byte-level
  BPE tokenizer trained on the shapes world's text, a CLIP image processor and a LLaVA processor. No hub, no
  network.

It freezes per part (vision tower, projector, language model), puts LoRA through peft on chosen
language-model layers only (a plain ``["q_proj", "v_proj"]`` target would also hit the CLIP tower), turns on
gradient checkpointing and SDPA attention, and offers the pieces the algorithms compose:

* ``encode_images(pixel_values) -> (n_images, image_tokens, hidden)``, computed once and reusable;
* ``hidden_states(input_ids, attention_mask, position_ids, images) -> (batch, seq, hidden)``; the mask may be
  2D padding ``(batch, seq)`` or a 4D boolean ``(batch, 1, seq, seq)`` (True = attend), used by DPO's packed
  shared-prefix sequences;
* ``token_logps(hidden, labels) -> TokenLogps``: log-probabilities of the label tokens computed from the hidden
  states at the labelled positions only, so the vocabulary projection never runs over the image and prompt tokens;
* ``generate(...)`` for data_prep and eval; ``export_adapter`` / ``export_merged`` (a merged checkpoint loads
  with plain ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``).

The model itself is built by ``build()``: load (checkpoint / compose / tiny), LoRA, what trains, gradient
checkpointing. The algorithms' base module calls it from ``configure_model``, so that DeepSpeed ZeRO-3 shards the
model while it is created (the helpers for that are in ``zero.py``); the processor is ready at construction, for
the DataModule. ``BackboneConfig.frozen_copy()`` is the config of a frozen reference of the same source.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from .data.chat import LLAVA_CHAT_TEMPLATE, TINY_CHAT_TEMPLATE
from .zero import gathered, inside_zero_init, partitioned, seeded, zero3_loading

LANGUAGE_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager")
# The checkpoints ``Backbone`` loads (``LlavaForConditionalGeneration``); the rest of the family has other vision
# paths (LLaVA-NeXT's any-resolution tiles, ...) that this class would silently mis-load.
LLAVA_MODEL_TYPES = ("llava",)
LLAVA_FAMILY = ("llava_next", "llava_next_video", "llava_onevision", "vipllava", "video_llava")


@dataclass
class LoraSpec:
    """LoRA on the language model (peft). ``r = 0`` turns LoRA off (full fine-tuning of the unfrozen parts).

    Args:
        r: LoRA rank (SeVa 1024, SIMA 128, mllm-dpo 128).
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the LoRA input.
        targets: names of the language model's linear layers to adapt (never matched in the vision tower).
        layers: indices of the decoder layers to adapt; ``None`` adapts all of them.
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LANGUAGE_LINEARS))
    layers: Optional[list[int]] = None

    def validate(self, key: str = "lora"):
        """Raise naming ``key.<field>`` for a value that cannot be right (see ``BackboneConfig.validate``)."""
        if not (isinstance(self.r, int) and self.r >= 0):
            raise ValueError(f"{key}.r must be an integer >= 0 (0: no LoRA), got {self.r!r}")
        if self.r == 0:
            return
        if not self.alpha > 0:
            raise ValueError(f"{key}.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{key}.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in LANGUAGE_LINEARS]
        if not self.targets or unknown:
            raise ValueError(f"{key}.targets must be a non-empty list of {LANGUAGE_LINEARS}, got {self.targets!r}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"{key}.layers must be null or decoder layer indices >= 0, got {self.layers!r}")

    def target_regex(self) -> str:
        layers = r"\d+" if self.layers is None else "(?:" + "|".join(str(i) for i in self.layers) + ")"
        names = "|".join(re.escape(t) for t in self.targets)
        return rf".*language_model\.layers\.{layers}\..*\.(?:{names})"


@dataclass
class TinySpec:
    """The embedded tiny LLaVA (random init; about 3.5M parameters at the defaults).

    Args:
        image_size: square input size in pixels (the shapes world draws 48 px images).
        patch_size: CLIP patch size; image tokens = (image_size / patch_size) ** 2.
        vision_hidden / vision_layers / vision_heads: the CLIP tower (at least 2 layers, since LLaVA reads
            the second-to-last one).
        text_hidden / text_layers / text_heads / text_kv_heads / text_intermediate: the Llama decoder.
        vocab_size: size of the offline-trained byte-level BPE vocabulary.
        max_positions: longest sequence (positions) the decoder supports.
        seed: seed of the random initialisation (the same seed gives the same weights).
    """

    image_size: int = 48
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 512
    vocab_size: int = 512
    max_positions: int = 1024
    seed: int = 0

    def validate(self, key: str = "tiny"):
        """Raise naming ``key.<field>`` for sizes the tiny LLaVA cannot be built with."""
        for name, value in vars(self).items():
            if name != "seed" and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{key}.{name} must be an integer > 0, got {value!r}")
        if self.vision_layers < 2:
            raise ValueError(f"{key}.vision_layers must be >= 2 (LLaVA reads the second-to-last vision layer), got "
                             f"{self.vision_layers}")
        if self.image_size % self.patch_size:
            raise ValueError(f"{key}.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        for hidden, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads"),
                              ("text_heads", "text_kv_heads")):
            if getattr(self, hidden) % getattr(self, heads):
                raise ValueError(f"{key}.{hidden} ({getattr(self, hidden)}) must be a multiple of {heads} "
                                 f"({getattr(self, heads)})")


@dataclass
class BackboneConfig:
    """Where the LLaVA comes from and which of its parts train.

    Args:
        checkpoint: a local directory in the transformers LLaVA format (e.g. a saved ``llava-1.5-7b-hf``, or this
            project's ``export_merged`` output). Takes precedence over the two below.
        vision_checkpoint: a local CLIP vision checkpoint, composed with ``language_checkpoint`` and a fresh
            projector when ``checkpoint`` is not given.
        language_checkpoint: a local Llama-family causal LM checkpoint (with its tokenizer).
        adapter: a LoRA adapter directory (peft format, from ``export_adapter``) loaded on top, trainable.
        tiny: the embedded tiny default, used when no checkpoint is given.
        train_vision: train the CLIP vision tower (False in every seed).
        train_projector: train the multimodal projector (needed after composing; SIMA trains it during DPO).
        train_language: train the language model: all its weights without LoRA, only the LoRA weights with it.
        lora: LoRA on the language model; ``r: 0`` for none.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        attn_implementation: ``"sdpa"`` (default; supports the 4D masks of packed DPO sequences) or ``"eager"``.
        dtype: dtype the weights are loaded in (``float32``, ``bfloat16``, ``float16``); Lightning's
            ``precision`` decides the compute dtype.
        chat_template: a Jinja chat template overriding the checkpoint's (default: the checkpoint's own, else
            LLaVA-1.5's ``USER: ... ASSISTANT: ...``).
    """

    checkpoint: Optional[str] = None
    vision_checkpoint: Optional[str] = None
    language_checkpoint: Optional[str] = None
    adapter: Optional[str] = None
    tiny: TinySpec = field(default_factory=TinySpec)
    train_vision: bool = False
    train_projector: bool = True
    train_language: bool = True
    lora: LoraSpec = field(default_factory=LoraSpec)
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    chat_template: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.tiny, dict):
            self.tiny = TinySpec(**self.tiny)
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**self.lora)

    def validate(self, key: str = "backbone"):
        """Raise naming ``key.<field>`` (the dotted key as written in the YAML) for a value that cannot be right: names,
        ranges, and every directory (it exists and holds what it should: a checkpoint's ``config.json`` must be a
        LLaVA one, see ``check_llava_checkpoint``). Reads a few small JSON files, builds nothing; ``Backbone`` and the
        modules' ``__init__`` call it, so a wrong config fails before any model is built."""
        if self.dtype not in DTYPES:
            raise ValueError(f"{key}.dtype must be one of {' | '.join(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(f"{key}.attn_implementation must be one of {' | '.join(ATTENTION)}, got "
                             f"{self.attn_implementation!r}")
        if (self.vision_checkpoint is None) != (self.language_checkpoint is None) and self.checkpoint is None:
            raise ValueError(f"{key}: composing a LLaVA needs both {key}.vision_checkpoint and "
                             f"{key}.language_checkpoint")
        for name in ("checkpoint", "vision_checkpoint", "language_checkpoint", "adapter"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise FileNotFoundError(f"{key}.{name}: {path!r} is not a local directory (models are never "
                                        "downloaded; on the embedded default, conf/sft.yaml exports one to "
                                        "runs/sft/export/merged)")
        if self.checkpoint is not None:
            check_llava_checkpoint(self.checkpoint, f"{key}.checkpoint")
        elif self.vision_checkpoint is not None:
            _check_model_type(self.vision_checkpoint, f"{key}.vision_checkpoint", ("clip_vision_model", "clip"),
                              "a CLIP vision checkpoint")
            _check_model_type(self.language_checkpoint, f"{key}.language_checkpoint", None,
                              "a causal language model checkpoint")
        if self.adapter is not None and not os.path.isfile(os.path.join(self.adapter, "adapter_config.json")):
            raise FileNotFoundError(f"{key}.adapter: {self.adapter} has no adapter_config.json: not a peft LoRA "
                                    "adapter (this project's export writes one to <export_dir>/adapter)")
        self.lora.validate(f"{key}.lora")
        if self.source == "tiny":
            self.tiny.validate(f"{key}.tiny")

    @property
    def source(self) -> str:
        if self.checkpoint:
            return "checkpoint"
        return "compose" if self.vision_checkpoint else "tiny"

    def frozen_copy(self) -> "BackboneConfig":
        """The same source as a frozen model (a reference): no new LoRA, nothing trains, no checkpointing.

        A saved ``adapter`` stays: the copy is the model this config starts from.
        """
        return replace(self, lora=LoraSpec(r=0), train_vision=False, train_projector=False, train_language=False,
                       gradient_checkpointing=False)


def _model_type(path: str, key: str) -> Optional[str]:
    """``model_type`` of ``path/config.json``; raises naming ``key`` when there is no readable config."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"{key}: {path} is a LoRA adapter, not a model: give its base model as the checkpoint "
                             "and this directory as backbone.adapter")
        if os.path.isfile(os.path.join(path, "merged", "config.json")):
            raise ValueError(f"{key}: {path} is an export directory: use {os.path.join(path, 'merged')}")
        raise FileNotFoundError(f"{key}: {path} has no config.json: not a transformers checkpoint directory")
    try:
        with open(cfg, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}: {cfg} is not readable JSON ({e})") from e
    return config.get("model_type") if isinstance(config, dict) else None


def _check_model_type(path: str, key: str, allowed: Optional[tuple[str, ...]], what: str):
    model_type = _model_type(path, key)
    if model_type is None or (allowed is not None and model_type not in allowed):
        raise ValueError(f"{key}: not {what}: {path} has model_type {model_type!r}"
                         + (f" (expected {' or '.join(repr(a) for a in allowed)})" if allowed else ""))


def check_llava_checkpoint(path: str, key: str = "checkpoint"):
    """Refuse, naming ``key``, a directory that is not a transformers LLaVA checkpoint (``model_type: llava``).

    A plain language model (``gpt2``, ``llama``) would otherwise load as a default-sized LLaVA with random weights or
    fail deep in transformers; the original LLaVA repository's layout (``llava_llama``, what the seeds publish)
    needs converting first.
    """
    model_type = _model_type(path, key)
    if model_type in LLAVA_MODEL_TYPES:
        return
    if model_type == "llava_llama" or (model_type or "").startswith("llava_") and model_type not in LLAVA_FAMILY:
        raise ValueError(
            f"{key}: {path} is in the original LLaVA repository layout (model_type {model_type!r}, "
            "LlavaLlamaForCausalLM with mm_projector weights), which transformers does not load: convert it to the "
            "transformers LLaVA layout first, offline: python data_prep/convert_checkpoint.py --model "
            f"{path} --vision <local CLIP vision dir> --out <new dir> (add --lora <adapter dir> for a LoRA "
            "checkpoint with its non_lora_trainables.bin; the adapter is merged in), then give <new dir> as the "
            "checkpoint")
    if model_type in LLAVA_FAMILY:
        raise ValueError(f"{key}: {path} has model_type {model_type!r}; this project trains "
                         f"LlavaForConditionalGeneration checkpoints (model_type {' or '.join(LLAVA_MODEL_TYPES)})")
    raise ValueError(f"{key}: not a LLaVA checkpoint: {path} has model_type {model_type!r}")


# --------------------------------------------------------------------------------------------------------------
# Processors


def _tiny_tokenizer(spec: TinySpec):
    """A byte-level BPE tokenizer trained offline on the shapes world's text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data.shapes import corpus

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    template_text = ["USER: ASSISTANT: SYSTEM:", "Answer the question using a single word or phrase."]
    tok.train_from_iterator(corpus() + template_text, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                            special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="right", model_max_length=spec.max_positions)


def clip_image_processor(size: int, mean=None, std=None):
    try:  # the PIL backend: identical pixels whether or not torchvision is installed
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    kw = {}
    if mean is not None:
        kw.update(image_mean=mean, image_std=std)
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kw)


def llava_processor(tokenizer, image_processor, patch_size: int, template: str):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)


def load_processor(cfg: BackboneConfig):
    """The processor (tokenizer + image processor + chat template) for a config, without building the model."""
    from transformers import AutoProcessor, AutoTokenizer, CLIPVisionConfig

    if cfg.source == "checkpoint":
        proc = AutoProcessor.from_pretrained(cfg.checkpoint, local_files_only=True)
    elif cfg.source == "compose":
        tok = AutoTokenizer.from_pretrained(cfg.language_checkpoint, local_files_only=True)
        if "<image>" not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.image_token = "<image>"
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        vis = CLIPVisionConfig.from_pretrained(cfg.vision_checkpoint, local_files_only=True)
        try:
            from transformers import AutoImageProcessor

            ip = AutoImageProcessor.from_pretrained(cfg.vision_checkpoint, local_files_only=True)
        except (OSError, ValueError):
            ip = clip_image_processor(vis.image_size)
        proc = llava_processor(tok, ip, vis.patch_size, LLAVA_CHAT_TEMPLATE)
    else:
        spec = cfg.tiny
        tok = _tiny_tokenizer(spec)
        proc = llava_processor(tok, clip_image_processor(spec.image_size), spec.patch_size, TINY_CHAT_TEMPLATE)
    if cfg.chat_template:
        proc.chat_template = cfg.chat_template
    if proc.chat_template is None:
        proc.chat_template = LLAVA_CHAT_TEMPLATE
    return proc


def _json_rewrite(path: str, edit):
    """Apply ``edit(dict) -> dict`` to the JSON file ``path`` (kept UTF-8, indented, key order preserved)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(edit(data), f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_llava(model, path: str):
    """``model.save_pretrained(path)`` (safetensors) with the CLIP tower's weights named as 4.x loaders expect.

    transformers 5.x saves a LLaVA under the ``llava-hf`` names (``language_model.model.*``,
    ``language_model.lm_head.weight``, ``multi_modal_projector.*``, ``vision_tower.*``) but drops the CLIP tower's
    ``vision_model.`` level (``vision_tower.encoder.*``; measured with 5.25). 4.x (and serving stacks that follow
    its names) look for ``vision_tower.vision_model.*`` and would leave the tower randomly initialised, with a
    warning only. The level is put back in every shard (and the index); 5.x reads the ``llava-hf`` names as well.
    """
    import glob

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path, safe_serialization=True)

    def legacy(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower."):]
        return key

    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            metadata, keys = f.metadata(), list(f.keys())
        if all(legacy(k) == k for k in keys):
            continue
        tensors = load_file(file)
        save_file({legacy(k): v for k, v in tensors.items()}, file, metadata=metadata)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        _json_rewrite(index, lambda d: {**d, "weight_map": {legacy(k): v for k, v in d["weight_map"].items()}})


def save_processor(processor, path: str):
    """Save a LLaVA processor so that transformers 5 AND the 4.x loaders read it (what serving stacks still run).

    transformers 5 writes one ``processor_config.json`` with the image processor nested inside, a tokenizer whose
    ``tokenizer_config.json`` names the class ``TokenizersBackend`` and lists unnamed extra special tokens
    (``extra_special_tokens: []``, the image token as a top-level ``image_token`` key), and no
    ``special_tokens_map.json``. transformers 4.x instead needs (read from its loaders, not run here: 4.x is not
    installed):

    * ``preprocessor_config.json``: ``AutoImageProcessor`` reads only this file; the class is named without the
      5.x backend suffix (``CLIPImageProcessorPil`` -> ``CLIPImageProcessor``);
    * ``processor_config.json`` without nested sub-processor dicts: 4.x ``ProcessorMixin.from_args_and_dict`` passes
      every key that is an ``__init__`` argument on, so a nested ``image_processor`` dict would replace the loaded
      image processor. Without it transformers 5 loads the image processor from ``preprocessor_config.json``;
    * ``tokenizer_config.json`` with a class 4.x knows (``LlamaTokenizerFast`` for a Llama tokenizer, else
      ``PreTrainedTokenizerFast``; both read ``tokenizer.json`` as it is, and 5.x maps both names to its own
      classes), ``extra_special_tokens`` as a name -> token dict (4.47-4.57 call ``.keys()`` on it: a list fails
      with "'list' object has no attribute 'keys'"), the chat template inline (4.x tokenizers read it there);
    * ``special_tokens_map.json`` (bos / eos / unk / pad and the additional special tokens, ``<image>`` among
      them) and ``chat_template.json`` (the processor's template, for 4.x before ``chat_template.jinja``).
    """
    processor.save_pretrained(path)
    image_processor = processor.image_processor.to_dict()
    image_processor.pop("processor_class", None)
    cls = image_processor.get("image_processor_type") or type(processor.image_processor).__name__
    image_processor["image_processor_type"] = cls.removesuffix("Pil").removesuffix("Fast")
    image_processor["processor_class"] = type(processor).__name__
    with open(os.path.join(path, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(image_processor, f, indent=2, ensure_ascii=False)
        f.write("\n")
    processor_config = os.path.join(path, "processor_config.json")
    if os.path.isfile(processor_config):
        _json_rewrite(processor_config, lambda d: {k: v for k, v in d.items() if not isinstance(v, dict)})

    tok = processor.tokenizer
    standard = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    template = processor.chat_template

    def legacy_tokenizer(cfg: dict) -> dict:
        cfg["tokenizer_class"] = ("LlamaTokenizerFast" if type(tok).__name__.startswith("Llama")
                                  else "PreTrainedTokenizerFast")
        extra = cfg.get("extra_special_tokens")
        unnamed = [str(t) for t in extra] if isinstance(extra, list) else []
        # 5.x saves a named extra token (the image token) as its own top-level key
        named = dict(extra) if isinstance(extra, dict) else {}
        named.update({k: v for k, v in cfg.items() if k.endswith("_token") and k not in standard
                      and isinstance(v, str)})
        if isinstance(getattr(tok, "image_token", None), str):
            named.setdefault("image_token", tok.image_token)
        cfg["extra_special_tokens"] = named
        additional = list(dict.fromkeys([*unnamed, *named.values()]))
        if additional:
            cfg["additional_special_tokens"] = additional
        if template and "chat_template" not in cfg:
            cfg["chat_template"] = template
        return cfg

    tokenizer_config = os.path.join(path, "tokenizer_config.json")
    _json_rewrite(tokenizer_config, legacy_tokenizer)
    with open(tokenizer_config, encoding="utf-8") as f:
        additional = json.load(f).get("additional_special_tokens", [])
    special = {name: str(getattr(tok, name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tok, name, None) is not None}
    if additional:
        special["additional_special_tokens"] = additional
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if template:
        with open(os.path.join(path, "chat_template.json"), "w", encoding="utf-8") as f:
            json.dump({"chat_template": template}, f, indent=2, ensure_ascii=False)
            f.write("\n")


# --------------------------------------------------------------------------------------------------------------
# Model building


def _tiny_model(spec: TinySpec, tokenizer, attn: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if spec.vision_layers < 2:
        raise ValueError("TinySpec.vision_layers must be >= 2 (LLaVA reads the second-to-last vision layer)")
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.text_hidden, num_hidden_layers=spec.text_layers,
                       num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                       intermediate_size=spec.text_intermediate, max_position_embeddings=spec.max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(spec.image_size // spec.patch_size) ** 2)
    config._attn_implementation = attn
    if not inside_zero_init():
        with seeded(spec.seed):
            return LlavaForConditionalGeneration(config)
    # ZeRO-3 partitions parameters as modules are created; initialise them gathered, then let them re-partition
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = LlavaForConditionalGeneration(config)
    with gathered(model.parameters()), seeded(spec.seed):
        model.init_weights()
    return model


def _init_lora_gathered(model: nn.Module, seed: int):
    """peft initialises LoRA weights after creating them, which is a no-op on ZeRO-3's empty partitions: do it
    on the gathered weights (A: Kaiming-uniform as peft does, B: zeros, so training starts from the base model)."""
    import math

    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with gathered([p for _, p in lora]), seeded(seed):
        for n, p in lora:
            if "lora_A" in n:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            else:
                nn.init.zeros_(p)


def _composed_model(cfg: BackboneConfig, tokenizer, dtype, attn: str):
    from transformers import (AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlavaConfig,
                              LlavaForConditionalGeneration)

    vis_cfg = CLIPVisionConfig.from_pretrained(cfg.vision_checkpoint, local_files_only=True)
    txt_cfg = AutoConfig.from_pretrained(cfg.language_checkpoint, local_files_only=True)
    config = LlavaConfig(vision_config=vis_cfg, text_config=txt_cfg,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(vis_cfg.image_size // vis_cfg.patch_size) ** 2)
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).to(dtype)
    vision = CLIPVisionModel.from_pretrained(cfg.vision_checkpoint, local_files_only=True, dtype=dtype)
    lm = AutoModelForCausalLM.from_pretrained(cfg.language_checkpoint, local_files_only=True, dtype=dtype)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if len(tokenizer) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


class TokenLogps(NamedTuple):
    """``Backbone.token_logps``: label log-probs (batch, seq) and, when asked for, the labelled positions' logits
    (n_labelled, vocab)."""

    logps: torch.Tensor
    logits: Optional[torch.Tensor] = None


class Backbone(nn.Module):
    """A LLaVA model (plus optional LoRA) and its processor; see the module docstring.

    ``model`` is the ``LlavaForConditionalGeneration`` (LoRA layers, when present, are injected into it);
    ``peft_model`` the peft wrapper around it (``None`` without LoRA).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.processor = load_processor(config)
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.model = None
        self.peft_model = None  # not a registered submodule: it wraps ``model``, whose weights are already ours

    # ---------------------------------------------------------------------------------------------------- build
    @property
    def built(self) -> bool:
        return self.model is not None

    def build(self, deepspeed_config: Optional[dict] = None) -> "Backbone":
        """Create the model in four steps: load it, add LoRA, choose what trains, turn on checkpointing. Idempotent.

        deepspeed_config: the DeepSpeed config when building under ZeRO-3 (``zero.deepspeed_config_of(trainer)``),
        so transformers loads checkpoint weights into the partitioned parameters.
        """
        if self.built:
            return self
        model = self._load(deepspeed_config)
        self._add_lora(model)
        self._freeze(model)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained leaves eval mode; training wants dropout (LoRA's included)
        self.model = model
        return self

    def _load(self, deepspeed_config: Optional[dict]):
        """The LLaVA of the config's source: a checkpoint, a composition, or the embedded tiny default."""
        cfg = self.config
        dtype, attn = DTYPES[cfg.dtype], cfg.attn_implementation
        if cfg.source == "checkpoint":
            from transformers import LlavaForConditionalGeneration

            with zero3_loading(deepspeed_config):
                model = LlavaForConditionalGeneration.from_pretrained(cfg.checkpoint, local_files_only=True,
                                                                      dtype=dtype, attn_implementation=attn)
        elif cfg.source == "compose":
            with zero3_loading(deepspeed_config):
                model = _composed_model(cfg, self.tokenizer, dtype, attn)
        else:
            model = _tiny_model(cfg.tiny, self.tokenizer, attn).to(dtype)
        if model.config.image_token_index != self.image_token_id:
            raise ValueError(f"the model's image_token_index {model.config.image_token_index} is not the tokenizer's "
                             f"<image> id {self.image_token_id}: the forward would fail with 'Image features and "
                             "image tokens do not match'")
        model.config.use_cache = False
        return model

    def _add_lora(self, model):
        """LoRA on the language model: a saved adapter, or a new one (initialised gathered under ZeRO-3)."""
        cfg = self.config
        if not (cfg.adapter or cfg.lora.r > 0):
            return
        from peft import LoraConfig, PeftModel, get_peft_model

        if cfg.adapter:
            peft_model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=cfg.train_language)
        else:
            lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                            target_modules=cfg.lora.target_regex(), bias="none")
            peft_model = get_peft_model(model, lc)
            if inside_zero_init():
                _init_lora_gathered(model, cfg.tiny.seed)
        object.__setattr__(self, "peft_model", peft_model)

    def _freeze(self, model):
        """What trains, per part: the vision tower, the projector, and the language model (its LoRA weights when
        it has LoRA, all its weights otherwise). Runs after LoRA is added: peft freezes everything but LoRA."""
        cfg = self.config
        model.requires_grad_(False)
        if self.peft_model is not None:
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(cfg.train_language)
        else:
            model.model.language_model.requires_grad_(cfg.train_language)
            model.lm_head.requires_grad_(cfg.train_language)
        model.model.vision_tower.requires_grad_(cfg.train_vision)
        model.model.multi_modal_projector.requires_grad_(cfg.train_projector)

    def _need(self):
        if not self.built:
            raise RuntimeError("Backbone.build() has not been called (LightningModules call it in configure_model)")
        return self.model

    # -------------------------------------------------------------------------------------------------- structure
    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: (image_size / patch_size)^2 for CLIP with the 'default' strategy (CLS dropped)."""
        ip, proc = self.processor.image_processor, self.processor
        size = ip.crop_size["height"] if getattr(ip, "crop_size", None) else ip.size["shortest_edge"]
        n = (size // proc.patch_size) ** 2 + proc.num_additional_image_tokens
        return n - 1 if proc.vision_feature_select_strategy == "default" else n

    def parts(self) -> dict[str, nn.Module]:
        m = self._need()
        return {"vision": m.model.vision_tower, "projector": m.model.multi_modal_projector,
                "language": nn.ModuleList([m.model.language_model, m.lm_head])}

    def named_trainable(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(part, name, parameter) for every trainable parameter."""
        for part, mod in self.parts().items():
            for n, p in mod.named_parameters():
                if p.requires_grad:
                    yield part, n, p

    def adapter_disabled(self):
        """Context in which the LoRA adapter is off (the reference model of DPO/PPO); a no-op without LoRA."""
        if self.peft_model is None:
            return contextlib.nullcontext()
        return self.peft_model.disable_adapter()

    @property
    def has_adapter(self) -> bool:
        return self.peft_model is not None

    @property
    def vision_frozen(self) -> bool:
        """True when nothing before the language model trains: image features can be shared with a reference."""
        return not (self.config.train_vision or self.config.train_projector)

    # ------------------------------------------------------------------------------------------------- compute
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) -> projected image features (n_images, image_tokens, hidden)."""
        m = self._need()
        cfg = m.config
        dtype = m.model.vision_tower.embeddings.patch_embedding.weight.dtype
        out = m.model.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return m.model.multi_modal_projector(feats)

    def embed(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with each run of image tokens replaced by one image's features, in order.

        input_ids: (batch, seq); image_features: (n_images, image_tokens, hidden) with n_images * image_tokens equal
        to the number of image tokens in ``input_ids``.
        """
        m = self._need()
        embeds = m.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        n = int(is_image.sum())
        if image_features is None or image_features.numel() == 0:
            if n:
                raise ValueError(f"{n} image tokens in the batch but no image features")
            return embeds
        feats = image_features.reshape(-1, image_features.shape[-1])
        if feats.shape[0] != n:
            raise ValueError(f"image features and image tokens do not match: {n} image tokens in the batch, "
                             f"{feats.shape[0]} feature vectors ({image_features.shape[0]} images)")
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                      image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last hidden states (batch, seq, hidden) of the language model.

        attention_mask: (batch, seq) padding mask (1 = token), or a boolean (batch, 1, seq, seq) mask
        (True = may attend) for packed sequences, which then need explicit ``position_ids`` (batch, seq).
        Give either ``pixel_values`` (n_images, 3, H, W) or precomputed ``image_features``.
        """
        m = self._need()
        if image_features is None and pixel_values is not None and pixel_values.numel():
            image_features = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, image_features)
        if position_ids is None:
            if attention_mask.dim() != 2:
                raise ValueError("a 4D attention mask needs explicit position_ids")
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and \
                m.config.text_config._attn_implementation == "eager":
            # transformers hands a 4D mask through unchanged, and eager attention ADDS it to the scores: a boolean
            # mask must become additive (0 where allowed, the dtype's minimum elsewhere), or packed rows see each
            # other (measured: log-probs off by ~2 nats). SDPA takes the boolean mask as it is.
            attention_mask = torch.zeros(attention_mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~attention_mask, torch.finfo(embeds.dtype).min)
        out = m.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., vocab)."""
        return self._need().lm_head(hidden)

    def token_logps(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4096,
                    keep_logits: bool = False) -> "TokenLogps":
        """Per-token log-probabilities of the labels, projecting only the labelled positions onto the vocabulary.

        ``labels[b, t]`` is the token predicted from position t (already shifted), -100 where nothing is
        predicted. hidden: (batch, seq, hidden); labels: (batch, seq). Returns ``TokenLogps``: ``logps``
        (batch, seq) float32 with 0 at unlabelled positions, and with ``keep_logits`` the ``logits``
        (n_labelled, vocab) of the labelled positions in row-major order (else None).
        Positions are projected ``chunk`` at a time, so peak memory is ``chunk x vocab`` floats.
        """
        mask = labels != -100
        h = hidden[mask]
        targets = labels[mask]
        logps = hidden.new_zeros(labels.shape, dtype=torch.float32)
        picked, kept = [], []
        for i in range(0, h.shape[0], chunk):
            lg = self.logits(h[i:i + chunk]).float()
            picked.append(torch.gather(lg.log_softmax(-1), 1, targets[i:i + chunk, None]).squeeze(1))
            if keep_logits:
                kept.append(lg)
        if picked:
            logps = logps.masked_scatter(mask, torch.cat(picked))
        logits = None
        if keep_logits:
            logits = torch.cat(kept) if kept else hidden.new_zeros(0, self._need().lm_head.out_features)
        return TokenLogps(logps, logits)

    # ---------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Optional[torch.Tensor],
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, use_adapter: bool = True,
                 synced_gpus: Optional[bool] = None) -> torch.Tensor:
        """Batched generation with the KV cache from left-padded prompts (batch, seq).

        The ``<image>`` token is never generated (a response holding it would not encode). ``synced_gpus`` keeps
        every rank stepping until all are done, which ZeRO-3 needs (each forward gathers parameters from all
        ranks); default: on when the parameters are ZeRO-3 partitions and more than one process runs.
        Returns the new tokens only, (batch, new), padded with the pad id after EOS.
        """
        m = self._need()
        if synced_gpus is None:
            synced_gpus = (partitioned(m) and torch.distributed.is_available() and torch.distributed.is_initialized()
                           and torch.distributed.get_world_size() > 1)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id, use_cache=True, synced_gpus=synced_gpus,
                      suppress_tokens=[self.image_token_id])
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # silence the sampling options a checkpoint's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        ctx = contextlib.nullcontext() if use_adapter else self.adapter_disabled()
        was_training = m.training
        m.eval()
        try:
            with ctx:
                pv = pixel_values if pixel_values is not None and pixel_values.numel() else None
                if pv is not None:
                    pv = pv.to(m.model.vision_tower.embeddings.patch_embedding.weight.dtype)
                if pv is not None:  # (passing pixel_values=None makes transformers run the vision tower on None)
                    kwargs["pixel_values"] = pv
                out = m.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            m.train(was_training)
        return out[:, input_ids.shape[1]:]

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------------- export
    def export_adapter(self, path: str):
        """Save the LoRA adapter in peft's format (plus the processor, so the folder is self-describing)."""
        if self.peft_model is None:
            raise ValueError("this backbone has no LoRA adapter to export; use export_merged")
        self.peft_model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)

    def merged_state_dict(self, dtype: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The plain LLaVA's weights on the CPU, every LoRA delta added: W' = W + (alpha / r) * B @ A.

        Read from the live model without copying it (a deep copy of ZeRO-3 partitioned or CUDA parameters is not
        reliably a copy of their values); under ZeRO-3 call it inside ``zero.gathered(parameters)``.
        """
        m = self._need()
        out = {}
        for key, value in m.state_dict().items():
            if "lora_" not in key:
                out[key.replace(".base_layer.", ".")] = value.detach().to("cpu", copy=True)
        if self.peft_model is not None:
            from peft.tuners.lora import LoraLayer

            for name, module in m.named_modules():
                if isinstance(module, LoraLayer) and not module.merged:
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            key = f"{name}.weight"
                            out[key] += module.get_delta_weight(adapter).to("cpu", out[key].dtype)
        if dtype:
            out = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in out.items()}
        return out

    def export_merged(self, path: str, dtype: Optional[str] = None):
        """Save a plain LLaVA checkpoint (LoRA merged in) that loads with transformers alone.

        Loads with ``LlavaForConditionalGeneration.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
        in transformers 5, and its processor, image processor and tokenizer also with the 4.x loaders that serving
        stacks use (``save_processor`` writes the legacy files beside the 5.x ones). The live model is left untouched
        (the merged weights are built on the CPU from its state dict).
        """
        import copy

        from transformers import LlavaForConditionalGeneration

        m = self._need()
        weights = self.merged_state_dict(dtype)
        config = copy.deepcopy(m.config)
        config.use_cache = True
        with torch.device("meta"):
            plain = LlavaForConditionalGeneration(config)
        plain.load_state_dict(weights, strict=True, assign=True)
        plain.generation_config = copy.deepcopy(m.generation_config)
        save_llava(plain, path)
        save_processor(self.processor, path)

    def describe(self) -> dict:
        """Parameter counts per part, trainable and total (for logs and tests)."""
        out = {}
        for part, mod in self.parts().items():
            ps = list(mod.parameters())
            out[part] = {"total": sum(p.numel() for p in ps),
                         "trainable": sum(p.numel() for p in ps if p.requires_grad)}
        return out
