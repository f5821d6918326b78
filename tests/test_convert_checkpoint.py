"""data_prep/convert_checkpoint.py on tiny checkpoints laid out exactly as the original LLaVA repository saves them
(sharded ``pytorch_model-*.bin`` + index, a ``llava_llama`` config.json, ``model.mm_projector.{0,2}``; a LoRA variant
with a plain Llama base, a peft adapter and ``non_lora_trainables.bin``): the output loads with ``Backbone`` and with
plain transformers, and its logits equal a forward assembled by hand from the original weights."""

import json
import os

import pytest
import torch

from convert_checkpoint import main as convert_main

V, H, VIS, IMG, PATCH = 300, 64, 32, 32, 8


def _tokenizer(path):
    """A Llama-style tokenizer directory of the checkpoint's own: <unk> <s> </s>, no <image>, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["USER: What is in the image? ASSISTANT: a red circle and a blue square."] * 4,
                            trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        path)


def _vision(path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlalign.backbone import clip_image_processor

    torch.manual_seed(1)
    cfg = CLIPVisionConfig(hidden_size=VIS, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMG, patch_size=PATCH, projection_dim=VIS)
    CLIPVisionModel(cfg).save_pretrained(path)
    clip_image_processor(IMG).save_pretrained(path)


def _llama_config(model_type):
    return {"architectures": ["LlavaLlamaForCausalLM" if model_type == "llava_llama" else "LlamaForCausalLM"],
            "model_type": model_type, "vocab_size": V, "hidden_size": H, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu",
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
            "torch_dtype": "float32", "use_cache": True}


LLAVA_FIELDS = {"mm_hidden_size": VIS, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
                "mm_patch_merge_type": "flat", "tune_mm_mlp_adapter": False, "tokenizer_padding_side": "right"}


def _llama_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = {k: v for k, v in _llama_config("llama").items() if k not in ("architectures", "model_type", "torch_dtype",
                                                                        "rope_scaling")}
    return {k: v.clone() for k, v in LlamaForCausalLM(LlamaConfig(**cfg)).state_dict().items()}


def _projector():
    g = torch.Generator().manual_seed(3)
    return {"model.mm_projector.0.weight": torch.randn(H, VIS, generator=g) * 0.1,
            "model.mm_projector.0.bias": torch.randn(H, generator=g) * 0.1,
            "model.mm_projector.2.weight": torch.randn(H, H, generator=g) * 0.1,
            "model.mm_projector.2.bias": torch.randn(H, generator=g) * 0.1}


def _save_sharded(path, weights):
    """Two ``pytorch_model-0000N-of-00002.bin`` shards and ``pytorch_model.bin.index.json``, as LLaVA saves."""
    os.makedirs(path, exist_ok=True)
    keys = sorted(weights)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in shards.items():
        torch.save({k: weights[k] for k in ks}, os.path.join(path, name))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f)


def _write_config(path, cfg):
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The vision dir and a full original-layout LLaVA (weights = Llama + projector)."""
    root = tmp_path_factory.mktemp("orig")
    _vision(str(root / "clip"))
    llama, proj = _llama_weights(), _projector()
    full = str(root / "llava-v1.5-tiny")
    _save_sharded(full, {**llama, **proj})
    _write_config(full, {**_llama_config("llava_llama"), **LLAVA_FIELDS})
    _tokenizer(full)
    return {"root": root, "clip": str(root / "clip"), "full": full, "llama": llama, "proj": proj}


def _inputs(processor):
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    image = Image.fromarray((torch.rand(40, 36, 3, generator=g) * 255).to(torch.uint8).numpy())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>\nWhat is in the image? ASSISTANT:"
    return processor(images=[image], text=[text], return_tensors="pt")


def _reference_logits(clip_dir, llama, proj, inputs, image_token_id):
    """LLaVA-1.5's forward assembled by hand: CLIP layer -2 without CLS -> W2 gelu(W0 x + b0) + b2 -> the image
    tokens' embeddings -> the Llama with the ORIGINAL weights (vocabulary V)."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    tower = CLIPVisionModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        feats = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        x = torch.nn.functional.gelu(feats @ proj["model.mm_projector.0.weight"].T + proj["model.mm_projector.0.bias"])
        x = x @ proj["model.mm_projector.2.weight"].T + proj["model.mm_projector.2.bias"]
        cfg = {k: v for k, v in _llama_config("llama").items() if k not in ("architectures", "model_type",
                                                                                "torch_dtype", "rope_scaling")}
        lm = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        lm.load_state_dict(llama)
        ids = inputs["input_ids"]
        is_image = ids == image_token_id
        assert int(is_image.sum()) == x.shape[1] == (IMG // PATCH) ** 2
        embeds = lm.model.embed_tokens(ids.masked_fill(is_image, 0))
        embeds[is_image] = x.reshape(-1, H)
        return lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits


def _check(out, clip_dir, llama, proj):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlalign.backbone import Backbone, BackboneConfig

    BackboneConfig(checkpoint=out).validate()  # the start-up check accepts it
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    inputs = _inputs(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_id and image_id >= V  # added after the original vocabulary
    assert model.config.text_config.vocab_size == 320  # 300 + <image> + <pad> = 302, rounded up to 64
    ref = _reference_logits(clip_dir, llama, proj, inputs, image_id)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == 320
    torch.testing.assert_close(logits[..., :V], ref, atol=1e-5, rtol=1e-5)

    bb = Backbone(BackboneConfig(checkpoint=out)).build()
    bb.model.eval()
    with torch.no_grad():
        hidden = bb.hidden_states(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"])
        torch.testing.assert_close(bb.logits(hidden)[..., :V], ref, atol=1e-5, rtol=1e-5)
    assert bb.image_token_id == image_id and bb.tokenizer.pad_token == "<pad>"


def test_full_original_checkpoint_converts_and_matches_the_hand_assembled_forward(world, tmp_path):
    out = str(tmp_path / "converted")
    convert_main(["--model", world["full"], "--vision", world["clip"], "--out", out])
    _check(out, world["clip"], world["llama"], world["proj"])
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # written atomically, no temp left


def test_lora_with_non_lora_trainables_is_merged(world, tmp_path):
    """A LoRA checkpoint as LLaVA's LoRA runs save it: a plain Llama base, the adapter dir (adapter_config.json,
    adapter_model.bin with peft keys, non_lora_trainables.bin with the projector, the llava_llama config.json)."""
    base = str(tmp_path / "vicuna-tiny")
    _save_sharded(base, world["llama"])
    _write_config(base, _llama_config("llama"))
    _tokenizer(base)
    lora = tmp_path / "llava-lora"
    lora.mkdir()
    r, alpha = 4, 8.0
    g = torch.Generator().manual_seed(5)
    adapter, merged = {}, dict(world["llama"])
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            a, b = torch.randn(r, H, generator=g) * 0.1, torch.randn(H, r, generator=g) * 0.1
            module = f"model.layers.{i}.self_attn.{proj}"
            adapter[f"base_model.model.{module}.lora_A.weight"] = a
            adapter[f"base_model.model.{module}.lora_B.weight"] = b
            merged[f"{module}.weight"] = merged[f"{module}.weight"] + (alpha / r) * b @ a
    torch.save(adapter, lora / "adapter_model.bin")
    torch.save({f"base_model.model.{k}": v for k, v in world["proj"].items()}, lora / "non_lora_trainables.bin")
    with open(lora / "adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "bias": "none",
                   "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
                   "base_model_name_or_path": "lmsys/vicuna-7b-v1.5"}, f)
    _write_config(str(lora), {**_llama_config("llava_llama"), **LLAVA_FIELDS})
    out = str(tmp_path / "converted")
    convert_main(["--model", base, "--lora", str(lora), "--vision", world["clip"], "--out", out])
    _check(out, world["clip"], merged, world["proj"])


def test_stored_tower_and_safetensors(world, tmp_path):
    """Some checkpoints store the tower (``model.vision_tower.vision_tower.*``) and use safetensors: the stored
    tower wins over --vision's weights."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(world["clip"]).state_dict()
    tower = {k: v * 1.5 if k.endswith("fc1.weight") else v for k, v in tower.items()}  # a fine-tuned tower
    src = tmp_path / "with-tower"
    src.mkdir()
    # LLaVA's CLIPVisionTower holds a CLIPVisionModel as .vision_tower, with its vision_model level
    stored = {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v.contiguous()
              for k, v in tower.items()}
    save_file({**world["llama"], **world["proj"], **stored}, str(src / "model.safetensors"))
    _write_config(str(src), {**_llama_config("llava_llama"), **LLAVA_FIELDS})
    _tokenizer(str(src))
    out = str(tmp_path / "converted")
    convert_main(["--model", str(src), "--vision", world["clip"], "--out", out, "--pad-vocab-to", "1"])
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out)
    got = model.model.vision_tower.state_dict()
    assert set(got) == set(tower)
    for k in tower:
        torch.testing.assert_close(got[k], tower[k])
    got = model.state_dict()
    assert got["lm_head.weight"].shape[0] == V + 2  # --pad-vocab-to 1: exactly <image> and <pad> added


def test_refusals_name_the_problem(world, tmp_path):
    from vlalign.backbone import BackboneConfig

    with pytest.raises(ValueError, match="convert_checkpoint.py"):  # the start-up check points at the converter
        BackboneConfig(checkpoint=world["full"]).validate()
    bad = tmp_path / "linear"
    bad.mkdir()
    _write_config(str(bad), {**_llama_config("llava_llama"), **LLAVA_FIELDS, "mm_projector_type": "linear"})
    with pytest.raises(ValueError, match="mm_projector_type 'linear'"):
        convert_main(["--model", str(bad), "--vision", world["clip"], "--out", str(tmp_path / "o")])
    _write_config(str(bad), {**_llama_config("llava_llama"), **LLAVA_FIELDS, "image_aspect_ratio": "anyres",
                             "mm_patch_merge_type": "spatial_unpad"})
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        convert_main(["--model", str(bad), "--vision", world["clip"], "--out", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")
