"""``python -m vlalign.export`` on a real tiny run (SFT with LoRA through the CLI), and the legacy (4.x) files of
``Backbone.export_merged``."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(processor):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shapes are there?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


def _logits(path, inputs):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**inputs).logits


def test_export_command_matches_the_end_of_fit_export(tmp_path, shapes_dir):
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    runs = tmp_path / "runs"
    cmd = [sys.executable, "src/train.py", "fit", "--config", "conf/sft.yaml", "--trainer.enable_progress_bar", "false",
           # the session's world read as shards (shapes_dir alone would rebuild it at the CLI's sizes under the
           # other tests); shapes_dir still serves the evaluation files
           "--data.train", f"{shapes_dir}/sft/train-*.tar", "--data.val", f"{shapes_dir}/sft/val-*.tar",
           "--data.shapes_dir", shapes_dir, "--data.num_workers", "0",
           "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
           "--trainer.default_root_dir", str(runs / "sft"), "--trainer.logger.init_args.save_dir", str(runs),
           "--model.init_args.backbone.lora.r", "4", "--model.init_args.export_dir", str(runs / "sft" / "export")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    live = runs / "sft" / "export"
    out = tmp_path / "exported"
    res = subprocess.run([sys.executable, "-m", "vlalign.export", "--config", str(runs / "sft" / "config.yaml"),
                          "--ckpt", str(runs / "sft" / "checkpoints" / "last.ckpt"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert sorted(os.listdir(out)) == ["adapter", "merged"]

    processor = AutoProcessor.from_pretrained(out / "merged")
    inputs = _inputs(processor)
    torch.testing.assert_close(_logits(out / "merged", inputs), _logits(live / "merged", inputs), atol=1e-6, rtol=0)
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(live / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained

    # a DeepSpeed checkpoint directory is refused with the way out in the message, before anything is written
    from vlalign.export import load_trainable

    ds = runs / "sft" / "checkpoints" / "ds.ckpt"
    ds.mkdir()
    with pytest.raises(ValueError, match="convert_zero_checkpoint_to_fp32_state_dict"):
        load_trainable(None, str(ds))


def test_merged_export_writes_the_files_4x_loaders_read(make_backbone, tmp_path):
    """preprocessor_config.json (CLIPImageProcessor), processor_config.json without nested dicts, a tokenizer class 4.x
    knows with its special tokens as 4.x reads them, the CLIP tower under vision_tower.vision_model.*; and
    transformers 5 loads the export with the same tokens, pixels and logits."""
    from safetensors import safe_open
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    bb = make_backbone()
    path = tmp_path / "merged"
    bb.export_merged(str(path))
    read = lambda name: json.loads((path / name).read_text())  # noqa: E731
    pre = read("preprocessor_config.json")
    assert pre["image_processor_type"] == "CLIPImageProcessor" and pre["processor_class"] == "LlavaProcessor"
    proc = read("processor_config.json")
    assert not any(isinstance(v, dict) for v in proc.values()) and proc["num_additional_image_tokens"] == 1
    tok = read("tokenizer_config.json")
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok["extra_special_tokens"] == {"image_token": "<image>"} and "<image>" in tok["additional_special_tokens"]
    assert tok["chat_template"] == bb.processor.chat_template
    special = read("special_tokens_map.json")
    assert special["pad_token"] == "<pad>" and special["additional_special_tokens"] == ["<image>"]
    assert read("chat_template.json")["chat_template"] == bb.processor.chat_template
    with safe_open(path / "model.safetensors", framework="pt") as f:
        towers = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert towers and all(k.startswith("vision_tower.vision_model.") for k in towers)

    processor = AutoProcessor.from_pretrained(path)
    assert type(AutoImageProcessor.from_pretrained(path)).__name__.startswith("CLIPImageProcessor")
    text = "USER: <image>\nWhat shapes are there? ASSISTANT: a red circle"
    assert AutoTokenizer.from_pretrained(path)(text).input_ids == bb.tokenizer(text).input_ids
    inputs, ours = _inputs(processor), _inputs(bb.processor)
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    assert torch.equal(inputs["pixel_values"], ours["pixel_values"])
    bb.model.eval()
    with torch.no_grad():
        live = bb.model(**ours).logits
    torch.testing.assert_close(_logits(path, inputs), live, atol=1e-6, rtol=0)
