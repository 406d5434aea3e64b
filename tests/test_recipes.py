"""Configs are the single source of every recipe: each shipped config trains, and each benchmark preset is one."""

import inspect
from pathlib import Path

import pytest
from bench import continual as continual_bench
from bench import engine, quality, throughput
from bench.recipes import BENCHMARK_KEYS, model_options

from pragnosia_pl import PragnosiaLM
from pragnosia_pl.cli import run_cli

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
TINY_MODEL = [
    "--model.init_args.d_model",
    "16",
    "--model.init_args.n_heads",
    "2",
    "--model.init_args.n_shared_layers",
    "2",  # lm.yaml's expert layers in every other block need two
]
TINY_DATA = ["--data.init_args.block_size", "32", "--data.init_args.batch_size", "2"]
TINY_DATA += ["--data.init_args.max_bytes_per_domain", "40000"]
TWO_STEPS = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
TWO_STEPS += ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_config_trains_two_steps(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["pragnosia"])
    validate = [] if config.name == "continual.yaml" else ["--trainer.val_check_interval", "2"]
    args = ["fit", "--config", str(config), *TINY_MODEL, *TINY_DATA, *TWO_STEPS, *validate]
    cli = run_cli([*args, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert cli.trainer.global_step == 2
    assert cli.trainer.logged_metrics or cli.trainer.callback_metrics  # it trained and logged


def config_model(config_file: str) -> dict:
    """``PragnosiaLM``'s arguments under a shipped config: its defaults, then the config's model section."""
    defaults = {
        name: p.default for name, p in inspect.signature(PragnosiaLM.__init__).parameters.items() if name != "self"
    }
    return {**defaults, **model_options(config_file)}


def differences(model: PragnosiaLM, config_file: str) -> set[str]:
    """The method options (not :data:`BENCHMARK_KEYS`) in which ``model`` differs from ``config_file``'s model."""
    reference, built = config_model(config_file), dict(model.hparams)
    return {key for key in reference if key not in BENCHMARK_KEYS and built[key] != reference[key]}


@pytest.mark.parametrize("name", ["", *quality.PRESET_VARIANTS])
def test_quality_presets_are_configs_with_documented_overrides(name, tmp_path):
    config = quality.QualityConfig.quick(num_experts=(8,), variants=quality.PRESET_VARIANTS)
    model = quality.build_model(config, quality.RunPlan("pragnosia", 8, name), str(tmp_path / "store"))
    config_file, overrides, why = quality.PRESETS[name or "quickstart"]
    assert differences(model, config_file) == set(overrides)
    assert not overrides or why, f"preset {name}: overrides {overrides} without a reason"


def test_throughput_contenders_train_the_quickstart_recipe(tmp_path):
    config = throughput.ThroughputConfig.quick()
    contender = throughput.Contender(8, "disk", 8)
    model = throughput.build_model(config, contender, str(tmp_path))
    assert differences(model, config.recipe) == {"expert_cache"}  # what the benchmark varies, with the store
    model.store.close()


def test_continual_variants_are_configs_continual_with_and_without_consolidation(tmp_path):
    config = continual_bench.ContinualConfig(d_model=16, n_shared_layers=1, n_heads=2)
    for variant, overrides in [("experts_per_domain: 8", set()), (continual_bench.PLAIN, {"experts_per_domain"})]:
        model = continual_bench.build_model(config, continual_bench.RunPlan("pragnosia", variant), str(tmp_path))
        assert differences(model, "continual.yaml") == overrides
    joint = continual_bench.build_model(config, continual_bench.RunPlan("joint"), str(tmp_path))
    assert differences(joint, "continual.yaml") == {"experts_per_domain"} and joint.consolidation is None


def test_engine_recipes_name_shipped_configs():
    shipped = {path.name for path in CONFIGS}
    assert {recipe[0] for recipe in engine.RECIPES.values() if recipe is not None} <= shipped


def test_a_changed_config_shows_as_a_difference(tmp_path):
    config = quality.QualityConfig.quick(num_experts=(8,))
    model = quality.build_model(config, quality.RunPlan("pragnosia", 8), str(tmp_path / "store"))
    assert differences(model, "streamed.yaml") >= {"objective", "expert_optimizer", "local_lr"}


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_config_takes_lightnings_usual_flags(config, tmp_path, monkeypatch):
    """bf16-mixed, a command-line scheduler, then --ckpt_path last, with every shipped config (2 steps, then 1 more)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["pragnosia"])
    flags = ["--trainer.precision", "bf16-mixed", "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"]
    args = ["fit", "--config", str(config), *TINY_MODEL, *TINY_DATA, *TWO_STEPS, *flags]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.num_sanity_val_steps", "0"]
    first = run_cli(args)
    assert first.trainer.global_step == 2 and first.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
    resumed = run_cli([*args, "--trainer.max_steps", "3", "--trainer.limit_train_batches", "3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3 and resumed.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
