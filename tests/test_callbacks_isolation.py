"""The callbacks package stands alone: no pragnosia_pl, and usable from a LightningCLI YAML file."""

import ast
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from callbacks import ConstantMemoryGuard, DomainSwitcher, MemoryMonitor

ROOT = Path(__file__).resolve().parents[1]

# The YAML form shown in the README.
TRAINER_YAML = """\
trainer:
  max_epochs: 3
  callbacks:
    - class_path: callbacks.MemoryMonitor
      init_args:
        every_n_steps: 10
    - class_path: callbacks.ConstantMemoryGuard
      init_args:
        warmup_steps: 20
        tolerance: 0.05
        max_bytes: 8589934592   # 8 GiB
        mode: raise
    - class_path: callbacks.DomainSwitcher
      init_args:
        schedule:
          - {domain: code, epochs: 1}
          - {domain: prose, epochs: 2}
"""


def test_import_works_without_pragnosia_pl():
    script = (
        "import sys\n"
        "sys.modules['pragnosia_pl'] = None  # any import of it now raises ImportError\n"
        "import callbacks\n"
        "from callbacks import ConstantMemoryGuard, DomainSwitcher, MemoryGrowthError, MemoryMonitor\n"
        "from callbacks import LearningRates, StoreModelSummary, TokenThroughput\n"
        "MemoryMonitor(); ConstantMemoryGuard(); DomainSwitcher([{'domain': 'a', 'epochs': 1}])\n"
        "LearningRates(); StoreModelSummary(); TokenThroughput()\n"
        "assert issubclass(MemoryGrowthError, RuntimeError)\n"
        "assert sorted(callbacks.__all__) == "
        "['ConstantMemoryGuard', 'DomainSwitcher', 'LearningRates', 'MemoryGrowthError', 'MemoryMonitor', "
        "'StoreModelSummary', 'TokenThroughput', 'count_tokens', 'process_peak_rss', 'read_memory']\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_module_of_the_package_imports_pragnosia_pl():
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] == "pragnosia_pl" for name in names), f"{path.name} imports {names}"


def test_readme_yaml_builds_the_callbacks_with_lightning_cli(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(TRAINER_YAML)
    cli = LightningCLI(
        BoringModel, BoringDataModule, run=False, args=["--config", str(config)], save_config_callback=None
    )
    monitor, guard, switcher = (
        next(c for c in cli.trainer.callbacks if isinstance(c, kind))
        for kind in (MemoryMonitor, ConstantMemoryGuard, DomainSwitcher)
    )
    assert monitor.every_n_steps == 10
    assert (guard.warmup_steps, guard.tolerance, guard.max_bytes, guard.mode) == (20, 0.05, 8 * 2**30, "raise")
    assert [tuple(stage) for stage in switcher.schedule] == [("code", 1), ("prose", 2)]
