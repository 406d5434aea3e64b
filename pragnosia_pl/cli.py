"""The ``pragnosia`` command: LightningCLI (``fit``, ``validate``, ``test``) plus ``generate``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from pragnosia_pl.checkpoint_io import AtomicCheckpointIO, CorruptCheckpointError, verify_checkpoint
from pragnosia_pl.data import TextDomains
from pragnosia_pl.lm_base import LanguageModel
from pragnosia_pl.module import NonFiniteLossError
from pragnosia_pl.store import CorruptRecordError

# What a user can fix: printed as one message, without a traceback (PRAGNOSIA_DEBUG=1 shows it).
USER_ERRORS = (
    ValueError, OSError, CorruptRecordError, CorruptCheckpointError, NonFiniteLossError, MisconfigurationException
)


class PragnosiaCLI(LightningCLI):
    """LightningCLI over every ``LanguageModel`` of the package and any ``LightningDataModule``.

    Checkpoints are written crash-safe (:class:`~pragnosia_pl.checkpoint_io.AtomicCheckpointIO`) unless the
    configuration names a ``CheckpointIO`` plugin of its own.
    """

    @override
    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def run_cli(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> PragnosiaCLI:
    """Runs (or only parses, ``run=False``) the LightningCLI; ``exit_on_error=False`` raises
    ``jsonargparse.ArgumentError`` on a bad command line or config instead of printing the usage and exiting."""
    return PragnosiaCLI(
        LanguageModel,
        TextDomains,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": exit_on_error},
        args=args,
        run=run,
    )


def generate(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="pragnosia generate", description="Sample text from a checkpoint.")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `pragnosia fit`")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=0, help="sample among the top-k bytes only (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(args)
    if not os.path.isfile(options.ckpt_path):
        parser.error(f"--ckpt_path {options.ckpt_path}: no such file")
    verify_checkpoint(options.ckpt_path)
    checkpoint = torch.load(options.ckpt_path, map_location="cpu", weights_only=False)
    module_name, _, class_name = checkpoint.get("model_class", "pragnosia_pl.module.PragnosiaLM").rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    model = model_class.load_from_checkpoint(options.ckpt_path, map_location=options.device).eval()
    model.checkpoint_file = options.ckpt_path  # a run folder moved since: its store snapshot is found near here
    torch.manual_seed(options.seed)
    sample = model.generate(options.prompt.encode(), options.max_new_tokens, options.temperature, options.top_k)
    sys.stdout.write(options.prompt + sample.decode("utf-8", errors="replace") + "\n")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] == "generate":
            generate(argv[1:])
        else:
            run_cli(None if args is None else argv, exit_on_error=False)  # None: LightningCLI reads sys.argv
    except ArgumentError as error:  # a bad command line or config file: the message, not the usage
        if os.environ.get("PRAGNOSIA_DEBUG"):
            raise
        sys.stderr.write(f"pragnosia: error: {error}\n(`pragnosia fit --help` lists the options)\n")
        sys.exit(2)
    except USER_ERRORS as error:
        if os.environ.get("PRAGNOSIA_DEBUG"):
            raise
        sys.stderr.write(f"pragnosia: error: {error}\n(set PRAGNOSIA_DEBUG=1 for the traceback)\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
