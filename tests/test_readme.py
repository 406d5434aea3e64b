"""The README matches a run: the metric names and paths it gives are the tags and files a short run writes, and its
commands run as written (the long ones, 1,000-step fits and benchmarks, are parsed and built, not run)."""

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pragnosia_pl.cli import CHECKPOINT_COMMANDS, main, run_cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY = [
    "--model.d_model", "16", "--model.n_shared_layers", "1", "--model.n_heads", "2", "--model.num_experts", "4",
    "--data.block_size", "32", "--data.batch_size", "4", "--data.max_bytes_per_domain", "20000",
    "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
    "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
]  # fmt: skip
METRIC = re.compile(r"`((?:train|val|test|memory)/[a-z_<>/]*[a-z_>]|lr-[A-Za-z]+)`")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pragnosia"])
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")


def quickstart(*args: str) -> None:
    """A 3-step run of configs/quickstart.yaml, small, under the config's own root (runs/quickstart)."""
    main(["fit", "--config", "configs/quickstart.yaml", *TINY, "--trainer.max_steps", "3", *args])


def scalar_tags(folder: Path) -> set[str]:
    tags = set()
    for run in folder.glob("version_*"):
        events = EventAccumulator(str(run))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    return tags


def test_the_readmes_metric_names_and_store_path_are_what_a_run_writes(tmp_path):
    quickstart()
    main(["test", "--config", "configs/quickstart.yaml", *TINY, "--ckpt_path", "last"])
    root = tmp_path / "runs" / "quickstart"
    tags = scalar_tags(root)
    names = set(METRIC.findall(README))
    assert {"train/tokens_per_s", "lr-AdamW", "lr-experts", "memory/mib_out_per_step", "test/bpb/<domain>"} <= names
    if not torch.cuda.is_available():
        names = {name for name in names if "cuda" not in name}
    expected = {name.replace("<domain>", domain) for name in names for domain in ("code", "prose")}
    assert expected - tags == set(), f"named in the README, not logged by the run: {sorted(expected - tags)}"

    assert "`<root>/version_N/expert_store`" in README and "`<root>/checkpoints`" in README
    stores = [path for path in root.glob("version_*/expert_store") if any(path.iterdir())]
    assert stores and (root / "checkpoints" / "last.ckpt").is_file()
    assert re.search(r"\| `store`, `store_dir` \| `host`, `<root>/version_N/expert_store` \|", README)


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def readme_commands(program: str) -> list[list[str]]:
    lines = [line for block in readme_blocks("bash") for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith(program + " ")]


def test_every_pragnosia_command_of_the_readme_runs_as_written(tmp_path, capsys):
    commands = readme_commands("pragnosia")
    assert {command[1] for command in commands} >= {"fit", "test", "generate", "score"}
    quickstart()  # the checkpoint the README's commands load: runs/quickstart/checkpoints/last.ckpt
    capsys.readouterr()
    for command in commands:
        if command[1] in CHECKPOINT_COMMANDS:  # run, as written
            main(command[1:])
            assert capsys.readouterr().out.strip(), command
        elif "--print_config" in command:  # run, as written
            with pytest.raises(SystemExit) as exit_info:
                main(command[1:])
            assert (
                exit_info.value.code in (0, None) and "class_path: pragnosia_pl.PragnosiaLM" in capsys.readouterr().out
            )
        else:  # 1,000-step runs: parsed and built as written (model, data, trainer), not run; without a
            # subcommand LightningCLI takes no --ckpt_path (test_cli runs `test --ckpt_path last`)
            args = command[2:]
            if "--ckpt_path" in args:
                del args[args.index("--ckpt_path") : args.index("--ckpt_path") + 2]
            cli = run_cli(args, run=False)
            assert cli.trainer is not None and cli.model is not None, command


def test_the_readmes_python_inference_runs_as_written(capsys):
    quickstart()
    inference = next(block for block in readme_blocks("python") if "load_from_checkpoint" in block)
    assert len(inference.strip().splitlines()) == 3
    capsys.readouterr()
    exec(inference, {})
    assert len(capsys.readouterr().out) > 100  # 200 bytes, some of them multi-byte or replaced
    for block in readme_blocks("python"):  # the training examples run for minutes: compiled here
        compile(block, "README.md", "exec")
