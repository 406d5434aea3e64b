"""Every YAML in configs/ parses with LightningCLI; the `pragnosia` command reports bad configuration in one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pragnosia_pl.cli import run_cli
from pragnosia_pl.lm_base import LanguageModel

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_there_are_configs():
    assert any(path.name == "quickstart.yaml" for path in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_parses_with_lightning_cli(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["--config", str(config), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model, LanguageModel)
    assert cli.datamodule is not None


def pragnosia(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from pragnosia_pl.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_bad_model_key_is_one_line_naming_the_key(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    done = pragnosia("fit", "--config", str(config), "--model.init_args.num_active_experts", "3", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.endswith(
        "pragnosia: error: model.expert_slots (2) must be between model.num_active_experts (3) and "
        "model.num_experts (32), or null (no cap)\n"
    )
    assert "Traceback" not in done.stderr


def test_print_config_works(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    done = pragnosia("fit", "--config", str(config), "--print_config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pragnosia_pl.PragnosiaLM" in done.stdout and "num_experts: 32" in done.stdout


def test_lightning_configuration_error_is_one_line(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    contradiction = ["--trainer.callbacks+=TQDMProgressBar", "--trainer.enable_progress_bar"]
    done = pragnosia("fit", "--config", str(config), *contradiction, "false", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.endswith(
        "pragnosia: error: Trainer was configured with `enable_progress_bar=False` but found `TQDMProgressBar` in "
        "callbacks list.\n"
    )
    assert "Traceback" not in done.stderr


def test_lm_recipe_trains_three_steps_at_a_tiny_width(tmp_path, monkeypatch):
    """configs/lm.yaml (issue 22): expert layers in every other block, a trained BPE, warmup plus cosine, bf16-mixed;
    3 steps at width 32 on a small slice of the standard library (the recipe's own corpus and width are a GPU's)."""
    from pragnosia_pl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRAGNOSIA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["pragnosia"])
    lm = Path(__file__).resolve().parents[1] / "configs" / "lm.yaml"
    main(["fit", "--config", str(lm), "--model.d_model", "32", "--model.n_shared_layers", "4", "--model.n_heads", "2",
          "--model.num_experts", "8", "--model.micro_batch", "2", "--data.domains", "{code: stdlib-code}",
          "--data.tokenizer", "bpe:300", "--data.max_bytes_per_domain", "200000", "--data.block_size", "32",
          "--data.batch_size", "4", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
          "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
          "--trainer.default_root_dir", "lm"])  # fmt: skip
    checkpoint = torch.load(tmp_path / "lm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["expert_layers"] == "every_other"
    assert checkpoint["state_dict"]["backbone.embed.weight"].shape == (300, 32)  # the vocabulary from the data
    assert checkpoint["lr_schedulers"][0]["total_steps"] == 3  # warmup plus cosine over the run
    assert "tokenizer" in checkpoint
