"""The `pragnosia` command takes Lightning's usual flags with every shipped config, and reports a bad value in one
line that names its key."""

import sys
from pathlib import Path

import pytest

from pragnosia_pl.cli import main, run_cli
from pragnosia_pl.lm_base import MAX_LEN

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY_RUN = [
    "--model.d_model", "16", "--model.n_shared_layers", "1", "--model.n_heads", "2",
    "--model.num_experts", "4", "--data.block_size", "32", "--data.batch_size", "4",
    "--data.max_bytes_per_domain", "20000", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
    "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own empty folder, with a bare argv (LightningCLI warns when args and argv both exist)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pragnosia"])


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


# --- Lightning's usual flags -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_progress_bar_can_be_turned_off_with_every_config(config):
    cli = run_cli(["--config", str(config), "--trainer.enable_progress_bar", "false"], run=False)
    assert cli.trainer.progress_bar_callback is None


def test_fit_writes_everything_under_default_root_dir(tmp_path):
    main(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.default_root_dir", "run_a"])
    written = files_under(tmp_path)
    assert written and all(name.startswith("run_a/") for name in written), sorted(written)
    assert {"run_a/checkpoints/last.ckpt", "run_a/version_0/config.yaml"} <= written
    assert any(name.startswith("run_a/version_0/events.out.tfevents") for name in written)
    assert any(name.startswith("run_a/version_0/expert_store/snapshots/") for name in written)  # the store and its
    assert any(name.startswith("run_a/version_0/expert_store/live-") for name in written)  # checkpoint snapshots


def test_fit_runs_with_the_progress_bar_off(tmp_path, capsys):
    main(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()  # the config's own root
    assert "it/s]" not in capsys.readouterr().err  # tqdm's rate


def test_ckpt_path_last_resumes_this_roots_own_run(tmp_path):
    run_cli(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.default_root_dir", "a"])
    run_cli(["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.default_root_dir", "b"])  # newer last.ckpt
    resumed = run_cli(
        ["fit", "--config", str(QUICKSTART), *TINY_RUN, "--trainer.default_root_dir", "a", "--trainer.max_steps", "4"]
        + ["--ckpt_path", "last"]
    )
    assert Path(resumed.trainer.ckpt_path) == tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert resumed.trainer.global_step == 4
    assert (tmp_path / "a" / "checkpoints").is_dir() and not (tmp_path / "runs").exists()


def test_an_explicit_checkpoint_dirpath_is_kept(tmp_path):
    cli = run_cli(
        ["--config", str(QUICKSTART), "--trainer.default_root_dir", "a"]
        + ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", "elsewhere"],
        run=False,
    )
    dirpaths = {Path(callback.dirpath) for callback in cli.trainer.checkpoint_callbacks}
    assert dirpaths == {tmp_path / "a" / "checkpoints", tmp_path / "elsewhere"}
    assert Path(cli.trainer.logger.save_dir) == Path("a")


# --- one line per bad value --------------------------------------------------------------------------------


def pragnosia_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.num_experts", "0"], "model.num_experts (0) must be > 0"),
        (
            ["--model.store", "nope"],
            "model.store: Expected a typing.Literal['device', 'host', 'disk', 'direct']. Got value: nope",
        ),
        (["--data.batch_size", "0"], "data.batch_size (0) must be ≥ 1"),
        (["--data.nope", "1"], "data.nope: Option 'nope' is not accepted"),
        (["--model.num_experts", "many"], "model.num_experts: Expected a <class 'int'>. Got value: many"),
        (["--trainer.max_steps", "many"], "trainer.max_steps: Expected a <class 'int'>. Got value: many"),
        (["--model", "nope.Model"], "model: No module named 'nope'"),
        (
            ["--trainer.callbacks+=callbacks.MemoryMonitor", "--trainer.callbacks.every_n_steps", "0"],
            "MemoryMonitor.every_n_steps (0) must be an integer ≥ 1",
        ),
    ],
)
def test_bad_flag_is_one_line_naming_the_key(capsys, args, message):
    assert pragnosia_error(capsys, *args) == f"pragnosia: error: {message}\n"


def test_bad_yaml_value_is_one_line_naming_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  init_args:\n    num_experts: 0\n")
    assert pragnosia_error(capsys, "--config", str(config)) == "pragnosia: error: model.num_experts (0) must be > 0\n"


def test_unwritable_store_dir_is_one_line_before_any_work(capsys):
    err = pragnosia_error(capsys, *TINY_RUN, "--model.store_dir", "/proc/nope")
    assert err.startswith("pragnosia: error: model.store_dir") and err.count("\n") == 1, err


def test_a_block_longer_than_the_rotary_table_is_one_line_naming_data_block_size(capsys):
    err = pragnosia_error(capsys, *TINY_RUN, "--data.block_size", str(MAX_LEN + 1))
    assert err == (
        f"pragnosia: error: a sequence of {MAX_LEN + 1} tokens exceeds the {MAX_LEN} positions of the model's "
        f"rotary table: data.block_size must be ≤ {MAX_LEN}\n"
    )
