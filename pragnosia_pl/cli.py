"""The ``pragnosia`` command: LightningCLI (``fit``, ``validate``, ``test``) plus ``generate`` and ``score``, which
load a checkpoint and need no configuration (they parse their flags and check them before loading anything)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from callbacks import StoreModelSummary
from pragnosia_pl.checkpoint_io import AtomicCheckpointIO, CorruptCheckpointError, verify_checkpoint
from pragnosia_pl.data import TextDomains
from pragnosia_pl.lm_base import MAX_LEN, VOCAB_SIZE, LanguageModel, check_sampling
from pragnosia_pl.module import NonFiniteLossError
from pragnosia_pl.schedules import fill_total_steps
from pragnosia_pl.store import CorruptRecordError

# What a user can fix: printed as one message, without a traceback (PRAGNOSIA_DEBUG=1 shows it).
USER_ERRORS = (
    ValueError,
    OSError,
    CorruptRecordError,
    CorruptCheckpointError,
    NonFiniteLossError,
    MisconfigurationException,
)


class PragnosiaCLI(LightningCLI):
    """LightningCLI over every ``LanguageModel`` of the package and any ``LightningDataModule``.

    Everything a run writes goes under ``trainer.default_root_dir`` (the working directory when unset): the
    logger's ``save_dir`` is linked to it, and a ``ModelCheckpoint`` without a ``dirpath`` writes to
    ``<default_root_dir>/checkpoints`` (not versioned, so ``--ckpt_path last`` resumes this root's own last
    checkpoint). The model's expert store defaults to ``<trainer.log_dir>/expert_store``, hence under it too.

    Checkpoints are written crash-safe (:class:`~pragnosia_pl.checkpoint_io.AtomicCheckpointIO`) unless the
    configuration names a ``CheckpointIO`` plugin of its own. Lightning's default model summary becomes
    ``callbacks.StoreModelSummary``, which adds the parameters in the expert store.
    """

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``: ``predict`` is left out (``pragnosia generate`` continues prompts)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    @override
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # listed in `pragnosia --help`; main() runs them. jsonargparse allows one add_subcommands() per parser and
        # keeps the action it returned (LightningCLI's, above) only as this attribute.
        for name, (description, _) in CHECKPOINT_COMMANDS.items():
            parser._subcommands_action.add_subcommand(
                name, LightningArgumentParser(description=description), help=description
            )

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=run_root)
        # The data's vocabulary sizes the model's embedding: typed once, as data.tokenizer.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        refuse_unsupported(config)
        checkpoints = os.path.join(run_root(config.trainer.default_root_dir), "checkpoints")
        callbacks = config.trainer.callbacks
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            if _is_checkpoint(callback) and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = checkpoints

    @staticmethod
    @override
    def configure_optimizers(lightning_module, optimizer, lr_scheduler=None):
        """The ``--optimizer``/``--lr_scheduler`` pair of the command line, the scheduler stepped once per training
        step (Lightning's default for a CLI scheduler is once per epoch); a ``WarmupCosine`` without ``total_steps``
        ends at the run's last step."""
        if lr_scheduler is None:
            return optimizer
        fill_total_steps(lr_scheduler, int(lightning_module.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    @override
    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        super()._add_configure_optimizers_method_to_model(subcommand)
        config = self.config_init[subcommand] if subcommand else self.config_init
        scheduler = config.get("lr_scheduler")
        if scheduler is None or config.get("optimizer") is not None:
            return  # none given, or Lightning has built the pair (``--optimizer`` given)
        # ``--lr_scheduler`` alone: Lightning would drop it; wrap the model's own optimizer (its lr, betas, fused)
        own = self.model.configure_optimizers

        def configure() -> dict:
            optimizer = own()
            return self.configure_optimizers(self.model, optimizer, instantiate_class(optimizer, scheduler))

        self.model.configure_optimizers = configure

    @override
    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        given = config.model.init_args.get("vocab_size") if "init_args" in config.model else None
        linked = getattr(self.model, "vocab_size", given)
        if given not in (None, VOCAB_SIZE, linked):  # the link overrides it: refuse rather than ignore it
            raise ValueError(
                f"model.vocab_size ({given}) is set from the data ({linked}): choose data.tokenizer instead"
            )

    @override
    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for index, callback in enumerate(trainer.callbacks):  # Lightning's default summary: add the store's parameters
            if type(callback) in (ModelSummary, RichModelSummary):
                trainer.callbacks[index] = StoreModelSummary()  # the default one has max_depth 1 too
        return trainer


UNSUPPORTED_PRECISION = ("bf16-true", "16-true", "64-true", "64", "transformer-engine", "transformer-engine-float16")


def refuse_unsupported(config: Namespace) -> None:
    """One line, before any work, for a flag the package cannot honour (rather than ignoring it)."""
    precision = str(config.trainer.get("precision") or "32-true")
    if precision in UNSUPPORTED_PRECISION:
        raise ValueError(
            f"trainer.precision ({precision}) is not supported: expert records and their optimizer state are float32 "
            "master weights; use bf16-mixed (CPU, GPU) or 16-mixed (GPU)"
        )
    scheduler = config.get("lr_scheduler")
    if scheduler is not None and "ReduceLROnPlateau" in str(scheduler.get("class_path", "")):
        raise ValueError(
            "lr_scheduler (ReduceLROnPlateau) is not supported: schedules are stepped once per training step and the "
            "experts' learning rate follows that step's factor; use a per-step schedule, e.g. pragnosia_pl.WarmupCosine"
        )


def run_root(default_root_dir: str | os.PathLike | None) -> str:
    """The folder a run writes under: ``trainer.default_root_dir``, or the working directory as in Lightning."""
    return os.fspath(default_root_dir) if default_root_dir else os.getcwd()


def _is_checkpoint(callback: object) -> bool:
    if not isinstance(callback, Namespace) or "class_path" not in callback:
        return False
    module_name, _, class_name = callback.class_path.rpartition(".")
    try:
        callback_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False
    return isinstance(callback_class, type) and issubclass(callback_class, ModelCheckpoint)


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


class _OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors reach :func:`main` as ``ValueError``: one line, no usage block."""

    @override
    def error(self, message: str):
        raise ValueError(message)


def _checkpoint_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=f"pragnosia {command}", description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `pragnosia fit`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    return parser


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def _load_model(ckpt_path: str, device: str) -> tuple[LanguageModel, dict]:
    """The model of a checkpoint written by ``pragnosia fit`` (its class is recorded in it), in eval mode, and the
    checkpoint's datamodule hyperparameters (``{}`` without)."""
    if not os.path.isfile(ckpt_path):
        raise ValueError(f"--ckpt_path {ckpt_path}: no such file")
    verify_checkpoint(ckpt_path)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module_name, _, class_name = checkpoint.get("model_class", "pragnosia_pl.module.PragnosiaLM").rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    model = model_class.load_from_checkpoint(ckpt_path, map_location=device).eval()
    model.checkpoint_file = ckpt_path  # a run folder moved since: its store snapshot is found near here
    return model, dict(checkpoint.get("datamodule_hyper_parameters") or {})


def generate(args: list[str]) -> None:
    """``pragnosia generate``: continue a prompt with a checkpoint's model."""
    parser = _checkpoint_parser("generate", CHECKPOINT_COMMANDS["generate"][0])
    parser.add_argument("--prompt", default="", help="text to continue (empty: a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (bytes, by default)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (the most likely token each time)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the top-k tokens only (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="sample in the nucleus of this mass (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads: one byte at a time makes small matrices, on which more threads mostly wait for "
        "each other (200 bytes on a loaded 2-core CPU: 2.4 s with 1, 63 s with 2)",
    )
    options = parser.parse_args(args)
    check_sampling(options.max_new_tokens, options.temperature, options.top_k, options.top_p, flag="--")
    if options.num_threads < 1:
        raise ValueError(f"--num_threads ({options.num_threads}) must be ≥ 1")
    _check_device(options.device)
    torch.set_num_threads(options.num_threads)
    model, _ = _load_model(options.ckpt_path, options.device)
    torch.manual_seed(options.seed)
    sample = model.generate(
        options.prompt.encode(), options.max_new_tokens, options.temperature, options.top_k, options.top_p
    )
    sys.stdout.write(options.prompt + sample.decode("utf-8", errors="replace") + "\n")


def score(args: list[str]) -> None:
    """``pragnosia score``: the bits per byte of whole files under a checkpoint's model."""
    parser = _checkpoint_parser("score", CHECKPOINT_COMMANDS["score"][0])
    parser.add_argument("files", nargs="+", help="files to score, each as a whole")
    parser.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="bytes predicted per window (default: the checkpoint's data.block_size, as validation reads them)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
    options = parser.parse_args(args)
    if options.block_size is not None and not 1 <= options.block_size <= MAX_LEN:
        raise ValueError(f"--block_size ({options.block_size}) must be between 1 and {MAX_LEN}")
    if options.batch_size < 1:
        raise ValueError(f"--batch_size ({options.batch_size}) must be ≥ 1")
    texts = {}
    for path in options.files:
        try:
            texts[path] = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"files: cannot read {path}: {error.strerror}") from None
        if not texts[path]:
            raise ValueError(f"files: {path} is empty")
    _check_device(options.device)
    model, data_options = _load_model(options.ckpt_path, options.device)
    block_size = options.block_size or int(data_options.get("block_size", 128))
    for path, text in texts.items():
        bpb, num_bytes = model.score(text, block_size, options.batch_size)
        sys.stdout.write(f"{path}: {bpb:.4f} bits per byte ({num_bytes:,} bytes, windows of {block_size})\n")


# What `pragnosia` runs itself, before (and without) LightningCLI: a description and the function.
CHECKPOINT_COMMANDS = {
    "generate": ("Continue a prompt with a checkpoint's model (greedy with --temperature 0)", generate),
    "score": ("Bits per byte of whole files under a checkpoint's model", score),
}


# Lines of jsonargparse's reports that frame the message rather than carry it.
_REPORT_FRAME = re.compile(
    r"^(- )?(Parser key \".*\":|Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|"
    r"Given value( type)?: .*|Expected a <class 'NoneType'>|Problem with given class_path .*:|"
    r"Expected a path but .* either not accessible or invalid)?$"
)


def one_line(error: BaseException) -> str:
    """The message of a bad value as one line that names its key.

    A constructor's own ``ValueError`` (``model.num_experts (0) must be > 0``) reaches us wrapped in
    jsonargparse's report of every Union alternative: the innermost such error is the message. A report of a
    bad command line or config file becomes ``<key>: <what is wrong>``.
    """
    while "\n" in str(error).strip() and isinstance(error.__cause__, USER_ERRORS):
        error = error.__cause__  # a multi-line report around the real error; one-line errors keep their context
    message = str(error).strip()
    if "\n" not in message:
        return message
    keys = re.findall(r'Parser key "([^"]+)"', message)
    nested = re.search(r"NestedArg\(key='([^']+)'", message)
    if nested and (not keys or keys[-1] != nested.group(1)):
        keys.append(nested.group(1))
    details = []
    for line in message.splitlines():
        line = line.strip()
        if not _REPORT_FRAME.match(line):
            line = line.removeprefix("- ")
            if line not in details:
                details.append(line)
    text = "; ".join(details) or message.splitlines()[0]
    return f"{'.'.join(keys)}: {text}" if keys else text


def main(args: list[str] | None = None) -> None:
    """The ``pragnosia`` command. A bad value or a user-fixable failure prints one line, ``pragnosia: error:
    ...``, and exits with status 2 (``PRAGNOSIA_DEBUG=1`` raises instead, with the traceback)."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in CHECKPOINT_COMMANDS:
            CHECKPOINT_COMMANDS[argv[0]][1](argv[1:])
        else:
            run_cli(None if args is None else argv, exit_on_error=False)  # None: LightningCLI reads sys.argv
    except (ArgumentError, *USER_ERRORS) as error:
        if os.environ.get("PRAGNOSIA_DEBUG"):
            raise
        sys.stderr.write(f"pragnosia: error: {one_line(error)}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
