"""Continual learning in one ``fit``: train on domains in turn and keep the matrix of losses after each stage."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from .continual_metrics import ContinualFigures, continual_figures
from .continual_report import continual_record, markdown_table, write_report


class Stage(NamedTuple):
    """One entry of a :class:`DomainSwitcher` schedule."""

    domain: str
    epochs: int


class DomainSwitcher(Callback):
    r"""Drive a datamodule through a schedule of domains and measure forgetting.

    Stage ``i`` of ``schedule`` trains for ``epochs`` epochs on ``domain``: at the start of ``fit`` and at every
    stage boundary the callback calls ``trainer.datamodule.set_domain(domain)`` and has the Trainer rebuild the
    train dataloader before the next epoch (``set_domain`` must change what ``train_dataloader()`` returns).
    At a boundary it also calls ``trainer.lightning_module.on_domain_switch(previous, new)`` when the module
    has that method (not before the first stage, and not again when a run resumes).

    Every stage ends with a validation run over every domain: the datamodule lists its domains, in the order of
    its validation dataloaders, in ``val_domain_names`` (without it, the schedule's domains in order of first
    appearance are used), and the module logs the loss on domain ``j`` under ``metric`` formatted with
    ``domain`` (its name) and ``index`` (``j``); a ``/dataloader_idx_{j}`` suffix added by Lightning is
    accepted. Row ``i`` of the loss matrix ``R[i][j]`` is read from ``trainer.callback_metrics`` after the
    validation at the end of stage ``i``. The loss before any training, ``b[j]``, comes from a
    ``trainer.validate(model, datamodule=...)`` run before ``fit`` with this callback (Lightning does not expose the
    sanity check's metrics); without one, FWT is not computed.

    From ``R`` and ``b`` (definitions in :mod:`callbacks.continual_metrics`; GEM, Lopez-Paz & Ranzato 2017,
    and Chaudhry et al. 2018, signs adapted to losses):

    - average final loss ``= mean_j R[T-1][j]``;
    - BWT ``= 1/(T-1) Σ_{i<T-1} (R[i][c_i] − R[T-1][c_i])`` with ``c_i`` stage ``i``'s domain; negative is
      forgetting, as in GEM;
    - forgetting ``= mean_{j trained before the last stage} (R[T-1][j] − min_{l<T-1} R[l][j])``; positive means
      the loss got worse;
    - FWT ``= mean_{i≥1, c_i new} (b[c_i] − R[i-1][c_i])``; positive is good.

    The same figures are computed for bits per byte when ``bpb_metric`` is logged. They are logged under
    ``continual/loss/...`` (and ``continual/bpb/...``) at the end of each stage, and at the end of ``fit``
    ``continual.json``, ``continual.md`` (markdown table) and ``continual.png`` (heat-map) are written into
    ``out_dir`` (default ``trainer.log_dir``). The matrices and the stage reached are saved in checkpoints, so a
    resumed run continues at the right stage.

    Args:
        schedule: stages in order, each a mapping ``{"domain": name, "epochs": n}``; ``trainer.max_epochs``
            must be the sum of the epochs.
        eval_all: require every domain's loss at every boundary (a missing one is an error); with ``False``
            only the trained domain's loss is required and missing entries are NaN.
        metric: key template of the per-domain validation loss, with ``{domain}`` and/or ``{index}``.
        bpb_metric: key template of the per-domain bits per byte, recorded when logged; ``None`` to skip.
        out_dir: directory for the report files; ``None`` for ``trainer.log_dir``.

    Attributes:
        domains: the evaluated domains, the columns of the matrices.
        loss_matrix: ``R``, one row per finished stage.
        bpb_matrix: the same for bits per byte (rows of NaN when not logged).
        initial_loss: ``b``, or ``None`` when no validation ran before training.
        report_paths: the files written at the end of ``fit``.

    Raises:
        ValueError: for a malformed ``schedule`` or ``metric``; in ``setup`` when the datamodule has no
            ``set_domain``, ``trainer.max_epochs`` does not match the schedule, validation would not run at every
            stage boundary, or a scheduled domain is not evaluated; on resume when the checkpoint's schedule
            differs.
        RuntimeError: when a domain's loss is missing at a boundary (``eval_all=True``), or no validation ran
            at the end of a stage.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import DomainSwitcher

        switcher = DomainSwitcher(schedule=[{"domain": "code", "epochs": 1}, {"domain": "prose", "epochs": 2}])
        trainer = Trainer(max_epochs=3, callbacks=[switcher])
        trainer.fit(model, datamodule=datamodule)  # datamodule.set_domain(name), datamodule.val_domain_names
        print(switcher.loss_matrix, switcher.figures()["loss"].forgetting)
    """

    def __init__(
        self,
        schedule: list[dict[str, Any]],
        eval_all: bool = True,
        metric: str = "val/loss/{domain}",
        bpb_metric: str | None = "val/bpb/{domain}",
        out_dir: str | None = None,
    ) -> None:
        self.schedule = _parse_schedule(schedule)
        for name, template in (("metric", metric), ("bpb_metric", bpb_metric)):
            if template is not None and "{domain}" not in template and "{index}" not in template:
                raise ValueError(
                    f"DomainSwitcher.{name} ({template!r}) must contain '{{domain}}' or '{{index}}', "
                    "e.g. 'val/loss/{domain}'"
                )
        self.eval_all = eval_all
        self.metric = metric
        self.bpb_metric = bpb_metric
        self.out_dir = out_dir
        self.domains: list[str] = []
        self.loss_matrix: list[list[float]] = []
        self.bpb_matrix: list[list[float]] = []
        self.initial_loss: list[float] | None = None
        self.initial_bpb: list[float] | None = None
        self.report_paths: list[Path] = []
        self._user_reload_every: int | None = None
        self._stage_ended_this_epoch = False
        self._metrics_before_validation: dict[str, Any] = {}

    @property
    def stage(self) -> int:
        """Index of the stage being trained (``len(schedule)`` once the schedule is done)."""
        return len(self.loss_matrix)

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.schedule)

    def figures(self) -> dict[str, ContinualFigures]:
        """Figures of the stages finished so far: ``"loss"``, and ``"bpb"`` when bits per byte were logged."""
        if not self.loss_matrix:
            return {}
        columns = [self.domains.index(stage.domain) for stage in self.schedule[: self.stage]]
        result = {"loss": continual_figures(self.loss_matrix, columns, self.initial_loss)}
        if any(not math.isnan(v) for row in self.bpb_matrix for v in row):
            result["bpb"] = continual_figures(self.bpb_matrix, columns, self.initial_bpb)
        return result

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        self.domains = self._evaluated_domains(datamodule)
        if stage != TrainerFn.FITTING:
            return
        if not callable(getattr(datamodule, "set_domain", None)):
            raise ValueError(
                "DomainSwitcher needs a LightningDataModule with a set_domain(name) method, passed as "
                f"trainer.fit(model, datamodule=...); got {type(datamodule).__name__}"
            )
        if trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs > self.total_epochs:
            raise ValueError(
                f"trainer.max_epochs ({trainer.max_epochs}) must equal the sum of DomainSwitcher.schedule's epochs "
                f"({self.total_epochs}): after the schedule there is no domain left to train on"
            )
        if trainer.max_epochs < self.total_epochs:
            rank_zero_warn(
                f"trainer.max_epochs ({trainer.max_epochs}) is less than the sum of DomainSwitcher.schedule's epochs "
                f"({self.total_epochs}): only the stages that fit will run"
            )
        if trainer.limit_val_batches == 0:
            raise ValueError(
                "DomainSwitcher evaluates every domain at each stage end: trainer.limit_val_batches must be > 0"
            )
        every = trainer.check_val_every_n_epoch
        boundaries = [self._end_epoch(i) for i in range(len(self.schedule))]
        if every is not None and any(end % every for end in boundaries):
            raise ValueError(
                f"trainer.check_val_every_n_epoch ({every}) must divide every stage's end epoch {boundaries} so that "
                "validation runs at each DomainSwitcher boundary; use 1"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        domains = self._evaluated_domains(trainer.datamodule)
        if domains != self.domains:  # a checkpoint's state was loaded after setup
            raise ValueError(
                f"DomainSwitcher: the datamodule's val_domain_names {domains} differ from the checkpoint's "
                f"{self.domains}; resume with the domains the run started with"
            )
        if self.stage >= len(self.schedule):
            rank_zero_warn("DomainSwitcher: the schedule is already complete; further training keeps the last domain")
            return
        stage = self.schedule[self.stage]
        trainer.datamodule.set_domain(stage.domain)
        rank_zero_info(
            f"DomainSwitcher: stage {self.stage + 1}/{len(self.schedule)}, training on {stage.domain!r} "
            f"for {stage.epochs} epoch(s)"
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_reload_setting(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # callback_metrics keeps values from earlier runs; only what this run logs (a new object) counts
        self._metrics_before_validation = dict(trainer.callback_metrics)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._record_initial(trainer)
        elif (
            trainer.state.fn == TrainerFn.FITTING
            and self.stage < len(self.schedule)
            and trainer.current_epoch == self._end_epoch(self.stage) - 1
            and trainer.is_last_batch
        ):
            self._end_stage(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stage_ended_this_epoch:
            self._stage_ended_this_epoch = False
            for name, figures in self.figures().items():
                for key, value in figures._asdict().items():
                    if math.isfinite(value):
                        pl_module.log(f"continual/{name}/{key}", value, on_step=False, on_epoch=True)
        elif self.stage < len(self.schedule) and trainer.current_epoch == self._end_epoch(self.stage) - 1:
            raise RuntimeError(
                f"DomainSwitcher: no validation ran at the end of stage {self.stage + 1} "
                f"({self.schedule[self.stage].domain!r}, epoch {trainer.current_epoch}); the module needs a "
                "validation_step, and validation must run at the end of that epoch"
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_reload_setting(trainer)
        if trainer.is_global_zero and self.loss_matrix:
            self.report_paths = self.write_report(Path(self.out_dir or trainer.log_dir or trainer.default_root_dir))
            rank_zero_info(f"DomainSwitcher: wrote {', '.join(str(p) for p in self.report_paths)}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_reload_setting(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": [list(stage) for stage in self.schedule],
            "domains": self.domains,
            "loss_matrix": self.loss_matrix,
            "bpb_matrix": self.bpb_matrix,
            "initial_loss": self.initial_loss,
            "initial_bpb": self.initial_bpb,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [Stage(*stage) for stage in state_dict["schedule"]]
        if saved != self.schedule:
            raise ValueError(
                f"DomainSwitcher.schedule {[s._asdict() for s in self.schedule]} differs from the checkpoint's "
                f"{[s._asdict() for s in saved]}; resume with the schedule the run started with"
            )
        self.domains = list(state_dict["domains"])
        self.loss_matrix = [list(row) for row in state_dict["loss_matrix"]]
        self.bpb_matrix = [list(row) for row in state_dict["bpb_matrix"]]
        self.initial_loss = state_dict["initial_loss"]
        self.initial_bpb = state_dict["initial_bpb"]

    def write_report(self, out_dir: Path) -> list[Path]:
        """Write ``continual.json``, ``continual.md`` and ``continual.png`` into ``out_dir``."""
        figures = self.figures()
        stage_domains = [stage.domain for stage in self.schedule[: self.stage]]
        matrices = {"loss": self.loss_matrix}
        initial = {"loss": self.initial_loss}
        if "bpb" in figures:
            matrices["bpb"], initial["bpb"] = self.bpb_matrix, self.initial_bpb
        record = continual_record(self.domains, stage_domains, matrices, initial, figures)
        record["schedule"] = [stage._asdict() for stage in self.schedule]
        markdown = "\n".join(
            markdown_table(self.domains, stage_domains, matrices[name], initial[name], figures.get(name), name)
            for name in matrices
        )
        heatmap = {
            "domains": self.domains,
            "stage_domains": stage_domains,
            "matrix": self.loss_matrix,
            "initial": self.initial_loss,
        }
        return write_report(out_dir, record, markdown, heatmap)

    def _evaluated_domains(self, datamodule: Any) -> list[str]:
        names = getattr(datamodule, "val_domain_names", None)
        domains = list(names) if names else list(dict.fromkeys(stage.domain for stage in self.schedule))
        missing = sorted({stage.domain for stage in self.schedule} - set(domains))
        if missing:
            raise ValueError(
                f"DomainSwitcher.schedule trains on {missing}, which the datamodule's val_domain_names {domains} "
                "do not evaluate; every scheduled domain needs a validation dataloader"
            )
        return domains

    def _end_epoch(self, stage: int) -> int:
        """Number of epochs trained when ``stage`` ends."""
        return sum(s.epochs for s in self.schedule[: stage + 1])

    def _read_row(self, trainer: pl.Trainer, template: str | None, required: set[str]) -> list[float]:
        before = self._metrics_before_validation
        fresh = {k: v for k, v in trainer.callback_metrics.items() if v is not before.get(k)}
        row = []
        for index, domain in enumerate(self.domains):
            key = template.format(domain=domain, index=index) if template else None
            value = None
            for candidate in (key, f"{key}/dataloader_idx_{index}") if key else ():
                if candidate in fresh:
                    value = float(fresh[candidate])
                    break
            if value is None and domain in required:
                raise RuntimeError(
                    f"DomainSwitcher: {key!r} was not logged by the validation at the end of stage {self.stage + 1} "
                    f"(logged: {sorted(fresh)}); log each domain's validation loss under DomainSwitcher.metric "
                    f"({self.metric!r}), e.g. self.log(f'val/loss/{{domain}}', loss, add_dataloader_idx=False)"
                )
            row.append(math.nan if value is None else value)
        return row

    def _record_initial(self, trainer: pl.Trainer) -> None:
        if self.loss_matrix or trainer.global_step > 0:
            return
        loss = self._read_row(trainer, self.metric, required=set())
        if all(math.isnan(v) for v in loss):
            return
        self.initial_loss = loss
        self.initial_bpb = self._read_row(trainer, self.bpb_metric, required=set())

    def _end_stage(self, trainer: pl.Trainer) -> None:
        stage = self.schedule[self.stage]
        required = set(self.domains) if self.eval_all else {stage.domain}
        loss = self._read_row(trainer, self.metric, required)
        self.loss_matrix.append(loss)
        self.bpb_matrix.append(self._read_row(trainer, self.bpb_metric, required=set()))
        self._stage_ended_this_epoch = True
        losses = ", ".join(f"{d} {v:.4f}" for d, v in zip(self.domains, loss))
        rank_zero_info(
            f"DomainSwitcher: stage {self.stage}/{len(self.schedule)} ({stage.domain!r}) done; loss {losses}"
        )
        if self.stage < len(self.schedule):
            self._switch(trainer, previous=stage.domain, new=self.schedule[self.stage].domain)

    def _switch(self, trainer: pl.Trainer, previous: str, new: str) -> None:
        trainer.datamodule.set_domain(new)
        on_domain_switch = getattr(trainer.lightning_module, "on_domain_switch", None)
        if callable(on_domain_switch):
            on_domain_switch(previous, new)
        # The Trainer builds the train dataloader once and rebuilds it at an epoch start only when
        # `reload_dataloaders_every_n_epochs` says so; ask for one rebuild, then give the setting back.
        if self._user_reload_every is None:
            self._user_reload_every = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1
        rank_zero_info(f"DomainSwitcher: stage {self.stage + 1}/{len(self.schedule)}, switched {previous!r} -> {new!r}")

    def _restore_reload_setting(self, trainer: pl.Trainer) -> None:
        if self._user_reload_every is not None:
            trainer.reload_dataloaders_every_n_epochs = self._user_reload_every
            self._user_reload_every = None


def _parse_schedule(schedule: Any) -> list[Stage]:
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__") or not list(schedule):
        raise ValueError(
            "DomainSwitcher.schedule must be a non-empty list of {domain: name, epochs: n}, "
            f"e.g. [{{'domain': 'code', 'epochs': 1}}]; got {schedule!r}"
        )
    stages = []
    for i, entry in enumerate(schedule):
        if not isinstance(entry, Mapping) or set(entry) != {"domain", "epochs"}:
            raise ValueError(
                f"DomainSwitcher.schedule[{i}] ({entry!r}) must have exactly the keys 'domain' and 'epochs'"
            )
        domain, epochs = entry["domain"], entry["epochs"]
        if not isinstance(domain, str) or not domain:
            raise ValueError(f"DomainSwitcher.schedule[{i}].domain ({domain!r}) must be a non-empty string")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"DomainSwitcher.schedule[{i}].epochs ({epochs!r}) must be an integer ≥ 1")
        stages.append(Stage(domain, epochs))
    return stages
