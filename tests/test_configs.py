"""Every YAML under conf/ parses with the real CLI parser, opens with its command, and lists complete sections."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "conf", "**", "*.yaml"), recursive=True))


def test_there_are_configs():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"sft.yaml", "dpo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_parses(path, capsys):
    """The real CLI parses the file (``--print_config``: parsed and checked, nothing instantiated)."""
    import yaml

    from vlalign.cli import main

    first = open(path).readline().strip()
    assert first == f"# python src/train.py fit --config {os.path.relpath(path, ROOT)}", \
        f"{path} must open with its own command"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    out = out[out.index("# lightning.pytorch"):]  # importing deepspeed may print a warning line first
    cfg = yaml.safe_load(out)
    assert cfg["model"]["class_path"].startswith("vlalign.")
    assert {"trainer", "model", "data"} <= set(cfg)
    args = cfg["model"]["init_args"]
    if "loss_params" in args:  # a preference loss: its names and parameters exist (the table is the only list)
        from vlalign.losses import Objective

        Objective.parse(args["loss"], args["loss_params"])


def test_print_config_is_complete():
    out = subprocess.run([sys.executable, "src/train.py", "fit", "--config", "conf/sft.yaml", "--print_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for key in ("trainer:", "model:", "class_path: vlalign.sft.SFTModule", "backbone:", "lora:", "optim:",
                "data:", "batch_size:", "max_length:"):
        assert key in out.stdout
