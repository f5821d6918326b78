"""The one contract for algorithms, checked as a user and a reviewer would: the README's worked example trains
through the real CLI as written, every algorithm is an ``AlignModule``, the README's loss table is the table in
``losses.py``, and no module reaches for a private name of another."""

import ast
import glob
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _readme() -> str:
    return open(README, encoding="utf-8").read()


def _worked_example() -> tuple[str, str]:
    """(the module's source, the command) of the README's worked example of an algorithm."""
    text = _readme().split("<!-- example: algorithm -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip()
    return code, command


def test_readme_worked_example_trains_as_written(tmp_path, make_backbone):
    code, command = _worked_example()
    sft = tmp_path / "sft"
    make_backbone().export_merged(str(sft))  # stands in for conf/sft.yaml's export
    algos = tmp_path / "my_algos"
    algos.mkdir()
    (algos / "unlikelihood.py").write_text(code)
    env_prefix, rest = command.split(" ", 1)
    assert env_prefix == "PYTHONPATH=my_algos" and rest.startswith("python src/train.py fit")
    args = shlex.split(rest)[1:]  # drop "python"
    runs = tmp_path / "runs"
    shorten = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
               "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
               "--model.init_args.backbone.checkpoint", str(sft),
               "--model.init_args.export_dir", str(runs / "export"),
               "--data.shapes_dir", str(tmp_path / "shapes"), "--data.shapes_train_images", "100"]
    env = dict(os.environ, PYTHONPATH=str(algos), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, *args, *shorten], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(runs / "unlikelihood"))  # one stable run directory per run name
    ea.Reload()
    for tag in ("train/loss", "train/nll", "train/unlikelihood", "val/loss", "train/tokens_seen"):
        assert ea.Scalars(tag), tag
    assert (runs / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_readme_loss_table_is_the_code_table():
    from vlalign.losses import describe_losses

    section = _readme().split("<!-- losses:begin -->\n", 1)[1].split("\n<!-- losses:end -->", 1)[0]
    assert section == describe_losses(), "run: python -m vlalign.losses --readme README.md"


def _algorithm_modules():
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "vlalign", "*.py"))):
        name = "vlalign." + os.path.basename(path)[:-3]
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and cls.__name__.endswith("Module"):
                names.append(cls)
    return names


def test_every_algorithm_is_an_alignmodule_one_level_deep():
    import lightning as L

    from vlalign.module import AlignModule

    algorithms = _algorithm_modules()
    assert {c.__name__ for c in algorithms} >= {"SFTModule", "RewardModule", "DPOModule", "KTOModule", "PPOModule"}
    for cls in algorithms:
        if cls is AlignModule:
            continue
        assert issubclass(cls, L.LightningModule)
        assert cls.__bases__ == (AlignModule,), f"{cls.__name__} must subclass AlignModule directly"
        assert "batch_spec" in vars(cls), f"{cls.__name__} must say which batches it needs"
        assert "step" in vars(cls) or "training_step" in vars(cls), cls.__name__
        for hook in ("configure_model", "configure_optimizers", "on_fit_end"):
            assert hook not in vars(cls), f"{cls.__name__} overrides {hook}: the base owns it"


def _project_files():
    for sub in ("src", "data_prep", "eval", "tests"):
        yield from glob.glob(os.path.join(ROOT, sub, "**", "*.py"), recursive=True)


def _project_module_names() -> set[str]:
    names = {"vlalign"}
    for path in glob.glob(os.path.join(ROOT, "src", "vlalign", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, os.path.join(ROOT, "src"))[:-3].replace(os.sep, ".")
        names.add(rel[:-len(".__init__")] if rel.endswith(".__init__") else rel)
    for sub in ("data_prep", "eval"):
        names |= {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, sub, "*.py"))}
    return names


@pytest.mark.parametrize("path", sorted(_project_files()), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_private_name_is_imported_from_another_module(path):
    """``from x import _name`` across the project's modules: a private helper of a sibling is not an API."""
    ours = _project_module_names()
    here = os.path.relpath(path, os.path.join(ROOT, "src"))[:-3].replace(os.sep, ".")
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: resolve against this module's package
            parts = here.split(".")[:-node.level] + ([node.module] if node.module else [])
            source = ".".join(parts)
        else:
            source = node.module or ""
        if source not in ours and source.split(".")[0] not in ("vlalign",):
            continue
        private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        assert not private, f"{os.path.relpath(path, ROOT)} imports private {private} from {source}"
