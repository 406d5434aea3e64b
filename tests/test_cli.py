"""The `pragnosia` command takes Lightning's usual flags with every shipped config, and reports a bad value in one
line that names its key."""

import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from pragnosia_pl import PragnosiaLM
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


def test_a_block_longer_than_the_rotary_table_is_one_line_naming_data_block_size_before_any_data_is_read(capsys):
    """The domain does not exist: reporting the block size, not the domain, shows that no file was read first."""
    args = [*TINY_RUN, "--data.block_size", str(MAX_LEN + 1), "--data.domains", "{a: nowhere/*.txt}"]
    err = pragnosia_error(capsys, *args)
    assert err == (
        f"pragnosia: error: data.block_size ({MAX_LEN + 1}) exceeds the {MAX_LEN} positions of the model's "
        f"rotary table: data.block_size must be ≤ {MAX_LEN}\n"
    )


@pytest.mark.parametrize("where", ["file", "file/store"])
def test_a_store_dir_that_is_a_file_says_so(tmp_path, capsys, where):
    (tmp_path / "file").write_text("not a folder")
    err = pragnosia_error(capsys, *TINY_RUN, "--model.store_dir", where)
    what = "is a file" if where == "file" else "lies under a file (file)"
    assert (
        err == f"pragnosia: error: model.store_dir ({where}) {what}, not a folder: give a folder for the expert store\n"
    )


# --- subcommands ---------------------------------------------------------------------------------------------


def test_help_lists_exactly_the_subcommands_that_run(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage == "usage: pragnosia [-c CONFIG] {fit,validate,test,generate,score} ...", usage


def unique_text(path: Path, seed: str) -> str:
    """Lines of hex digests: no two blocks of it hold the same bytes."""
    path.write_text("".join(hashlib.sha256(f"{seed}{i}".encode()).hexdigest() + "\n" for i in range(400)))
    return str(path)


def block_texts(dataset) -> set[bytes]:
    return {bytes(x.tolist()) + bytes(y[-1:].tolist()) for x, y in (dataset[i] for i in range(len(dataset)))}


def test_test_reports_bpb_per_domain_on_a_split_never_trained_or_validated_on(tmp_path):
    domains = f"{{alpha: {unique_text(tmp_path / 'a.txt', 'a')}, beta: {unique_text(tmp_path / 'b.txt', 'b')}}}"
    run = ["--config", str(QUICKSTART), *TINY_RUN, "--data.domains", domains, "--trainer.enable_progress_bar", "false"]
    main(["fit", *run])
    cli = run_cli(["test", *run, "--ckpt_path", "last"])
    metrics, data, model = cli.trainer.callback_metrics, cli.datamodule, cli.model.eval()
    for i, name in enumerate(["alpha", "beta"]):
        test, val, train = data.test_dataloader()[i].dataset, data.val_dataloader()[i].dataset, data._train[name]
        assert len(test) > 0 and not block_texts(test) & (block_texts(train) | block_texts(val))
        x, y = (torch.stack(parts) for parts in zip(*(test[j] for j in range(len(test)))))  # (N, T) each
        with torch.no_grad():  # the reference: every test block, from the checkpoint's weights
            bpb = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() / math.log(2)
        assert metrics[f"test/bpb/{name}"].item() == pytest.approx(bpb, rel=1e-5)
    assert "test/bpb" in metrics


def test_predict_is_not_a_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--config", str(QUICKSTART)])
    assert "predict" in capsys.readouterr().err


def test_model_summary_counts_the_experts_in_the_store(caplog):
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(QUICKSTART), *TINY_RUN[:-2], "--trainer.enable_progress_bar", "false"])
    per_expert = sum(p.numel() for p in PragnosiaLM(**TINY).build_expert().parameters())  # d=16, 4·16 hidden
    in_store = 4 * per_expert  # --model.num_experts 4
    assert f"{get_human_readable_count(in_store):<10}Params in the store" in caplog.text, caplog.text
