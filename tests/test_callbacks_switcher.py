"""DomainSwitcher: schedule, loss matrix, continual-learning figures, report files, resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from torch.utils.data import DataLoader, TensorDataset

from callbacks import DomainSwitcher
from callbacks.continual_metrics import ContinualFigures, continual_figures

SCHEDULE = [{"domain": "a", "epochs": 1}, {"domain": "b", "epochs": 2}, {"domain": "c", "epochs": 1}]
OFFSETS = {"a": 2.0, "b": -2.0, "c": 4.0}  # each domain asks for a different output: training on one forgets another


class ToyDomains(LightningDataModule):
    """Three domains of 32-wide inputs whose targets differ by domain; a tag column says which domain a row is."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.val_domain_names = list(OFFSETS)
        self.domain: str | None = None
        self.built_for: list[str | None] = []
        self.x = 0.1 * torch.randn(size, 32, generator=torch.Generator().manual_seed(0))

    def set_domain(self, name: str) -> None:
        self.domain = name

    def _dataset(self, domain: str) -> TensorDataset:
        n = len(self.x)
        tag = torch.full((n,), self.val_domain_names.index(domain))
        return TensorDataset(self.x, torch.full((n, 2), OFFSETS[domain]), tag)

    def train_dataloader(self) -> DataLoader:
        self.built_for.append(self.domain)
        return DataLoader(self._dataset(self.domain), batch_size=4)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self._dataset(domain), batch_size=16) for domain in self.val_domain_names]


class ToyRegressor(BoringModel):
    """Lightning's demo model, logging its validation loss per domain and recording what it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.trained_on: dict[int, set[int]] = {}
        self.switches: list[tuple[str, str]] = []

    def training_step(self, batch, batch_idx):
        x, y, tag = batch
        self.trained_on.setdefault(self.current_epoch, set()).update(tag.tolist())
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, _ = batch
        domain = self.trainer.datamodule.val_domain_names[dataloader_idx]
        loss = F.mse_loss(self(x), y)
        self.log(f"val/loss/{domain}", loss, add_dataloader_idx=False)
        self.log(f"val/bpb/{domain}", loss / math.log(2), add_dataloader_idx=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)

    def on_domain_switch(self, previous: str, new: str) -> None:
        self.switches.append((previous, new))


def make_trainer(tmp_path, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=4,
    )
    options.update(kwargs)
    return Trainer(**options)


def test_switcher_drives_the_schedule_and_writes_the_report(tmp_path):
    switcher = DomainSwitcher(SCHEDULE)
    data, model = ToyDomains(), ToyRegressor()
    trainer = make_trainer(tmp_path, callbacks=[switcher])
    trainer.validate(model, datamodule=data, verbose=False)  # the loss before any training, for FWT
    trainer.fit(model, datamodule=data)

    assert data.built_for == ["a", "b", "c"]  # one train dataloader per stage, built after each switch
    assert model.trained_on == {0: {0}, 1: {1}, 2: {1}, 3: {2}}
    assert model.switches == [("a", "b"), ("b", "c")]
    assert switcher.domains == ["a", "b", "c"]
    R, b = switcher.loss_matrix, switcher.initial_loss
    assert len(R) == 3 and all(len(row) == 3 for row in R) and len(b) == 3
    for stage, column in enumerate([0, 1, 2]):  # each stage lowers the loss on its own domain...
        assert R[stage][column] < 0.5 * b[column]
    assert R[1][0] > 2 * R[0][0]  # ...and training on "b" (target -2) forgets "a" (target +2)

    figures = switcher.figures()
    assert figures["loss"] == continual_figures(R, [0, 1, 2], b)
    assert figures["loss"].forgetting > 0 and figures["loss"].bwt < 0
    assert figures["bpb"].average_final == pytest.approx(figures["loss"].average_final / math.log(2), rel=1e-5)
    for key, value in figures["loss"]._asdict().items():
        assert trainer.callback_metrics[f"continual/loss/{key}"].item() == pytest.approx(value, rel=1e-5)

    assert [p.name for p in switcher.report_paths] == ["continual.json", "continual.md", "continual.png"]
    record = json.loads((tmp_path / "continual.json").read_text())
    assert record["stages"] == ["a", "b", "c"] and record["domains"] == ["a", "b", "c"]
    assert record["metrics"]["loss"]["matrix"] == R  # JSON floats round-trip exactly
    assert record["metrics"]["loss"]["figures"]["fwt"] == pytest.approx(figures["loss"].fwt)
    table = (tmp_path / "continual.md").read_text()
    assert "| loss after \\ on | a | b | c |" in table and "| stage 2 (b) |" in table and "| before training |" in table
    assert (tmp_path / "continual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("save_on_train_epoch_end", [True, False])
def test_resume_mid_schedule_continues_at_the_right_stage(tmp_path, save_on_train_epoch_end):
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=save_on_train_epoch_end)
    uninterrupted = DomainSwitcher(SCHEDULE)
    make_trainer(tmp_path, enable_checkpointing=True, callbacks=[uninterrupted, checkpoints]).fit(
        ToyRegressor(), datamodule=ToyDomains()
    )

    # epoch 0 ends stage "a" (a boundary); epoch 1 is the middle of stage "b"
    for epoch, built_for, switches in [(0, ["b", "c"], [("b", "c")]), (1, ["b", "c"], [("b", "c")])]:
        (path,) = (tmp_path / "ckpt").glob(f"epoch={epoch}-*.ckpt")
        switcher, data, model = DomainSwitcher(SCHEDULE), ToyDomains(), ToyRegressor()
        make_trainer(tmp_path / f"resume{epoch}", callbacks=[switcher]).fit(model, datamodule=data, ckpt_path=path)
        assert data.built_for == built_for
        assert model.trained_on == {e: {"abc".index(d)} for e, d in enumerate("abbc") if e > epoch}
        assert model.switches == switches
        torch.testing.assert_close(torch.tensor(switcher.loss_matrix), torch.tensor(uninterrupted.loss_matrix))

    reordered = ToyDomains()
    reordered.val_domain_names.reverse()
    trainer = make_trainer(tmp_path / "reordered", callbacks=[DomainSwitcher(SCHEDULE)])
    with pytest.raises(
        ValueError, match=r"val_domain_names \['c', 'b', 'a'\] differ from the checkpoint's \['a', 'b', 'c'\]"
    ):
        trainer.fit(ToyRegressor(), datamodule=reordered, ckpt_path=path)


def test_partial_evaluation_and_short_runs(tmp_path):
    class OnlyCurrentDomain(ToyRegressor):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            domain = self.trainer.datamodule.val_domain_names[dataloader_idx]
            if domain == self.trainer.datamodule.domain:
                super().validation_step(batch, batch_idx, dataloader_idx)

    switcher = DomainSwitcher(SCHEDULE, eval_all=False)
    with pytest.warns(UserWarning, match=r"trainer.max_epochs \(3\) is less than the sum .* \(4\): only the stages"):
        make_trainer(tmp_path, max_epochs=3, callbacks=[switcher]).fit(OnlyCurrentDomain(), datamodule=ToyDomains())
    assert len(switcher.loss_matrix) == 2  # stage "b" is the last to finish; "c" never starts
    assert math.isnan(switcher.loss_matrix[0][1]) and not math.isnan(switcher.loss_matrix[0][0])
    assert math.isnan(switcher.figures()["loss"].bwt)  # needs R[T-1][a], which was not measured
    record = json.loads((tmp_path / "continual.json").read_text())
    assert record["metrics"]["loss"]["matrix"][0][1] is None and record["stages"] == ["a", "b"]


class SuffixedLogging(ToyRegressor):
    """Logs ``val/loss/<domain>`` and lets Lightning append ``/dataloader_idx_<j>``."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, _ = batch
        self.log(f"val/loss/{self.trainer.datamodule.val_domain_names[dataloader_idx]}", F.mse_loss(self(x), y))


class IndexedLogging(ToyRegressor):
    """Logs one ``val_loss`` per dataloader: ``val_loss/dataloader_idx_<j>``."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, _ = batch
        self.log("val_loss", F.mse_loss(self(x), y))


@pytest.mark.parametrize(
    ("module", "metric"), [(SuffixedLogging, "val/loss/{domain}"), (IndexedLogging, "val_loss/dataloader_idx_{index}")]
)
def test_generic_metric_names(tmp_path, module, metric):
    switcher = DomainSwitcher(SCHEDULE[:1], metric=metric, bpb_metric=None)
    make_trainer(tmp_path, max_epochs=1, callbacks=[switcher]).fit(module(), datamodule=ToyDomains())
    assert len(switcher.loss_matrix[0]) == 3 and not any(map(math.isnan, switcher.loss_matrix[0]))
    assert "bpb" not in switcher.figures()


def test_continual_figures_hand_computed():
    R = [
        [1.0, 5.0, 6.0],
        [2.0, 1.5, 5.5],
        [2.5, 2.0, 1.0],
    ]
    b = [4.0, 6.0, 7.0]
    figures = continual_figures(R, [0, 1, 2], b)
    assert figures.average_final == pytest.approx((2.5 + 2.0 + 1.0) / 3)
    assert figures.bwt == pytest.approx(((1.0 - 2.5) + (1.5 - 2.0)) / 2)  # -1.0: forgetting
    assert figures.forgetting == pytest.approx(((2.5 - 1.0) + (2.0 - 1.5)) / 2)  # +1.0: losses got worse
    assert figures.fwt == pytest.approx(((6.0 - 5.0) + (7.0 - 5.5)) / 2)  # +1.25: earlier stages helped

    # a domain trained twice: FWT only counts new domains, forgetting each earlier domain once
    repeated = continual_figures(R, [0, 1, 0], b)
    assert repeated.bwt == pytest.approx(((1.0 - 2.5) + (1.5 - 2.0)) / 2)
    assert repeated.fwt == pytest.approx(6.0 - 5.0)
    assert repeated.forgetting == pytest.approx(((2.5 - 1.0) + (2.0 - 1.5)) / 2)

    assert continual_figures([[1.0, 3.0], [2.0, 1.5]], [0, 1], [4.0, 4.0]) == ContinualFigures(1.75, -1.0, 1.0, 1.0)
    one = continual_figures([[1.0, math.nan]], [0])
    assert one.average_final == 1.0 and all(math.isnan(v) for v in one[1:])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], [0]), r"continual_figures needs at least one row"),
        (([[1.0, 2.0], [1.0]], [0, 1]), r"every row and the initial losses must have 2 columns"),
        (([[1.0, 2.0]], [2]), r"stage_columns \[2\] must give one column in \[0, 2\) per row"),
    ],
)
def test_continual_figures_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        continual_figures(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": []}, r"DomainSwitcher.schedule must be a non-empty list of \{domain: name, epochs: n\}"),
        ({"schedule": [{"domain": "a"}]}, r"DomainSwitcher.schedule\[0\] .* must have exactly the keys 'domain'"),
        (
            {"schedule": [{"domain": "", "epochs": 1}]},
            r"DomainSwitcher.schedule\[0\].domain \(''\) must be a non-empty",
        ),
        ({"schedule": [{"domain": "a", "epochs": 0}]}, r"DomainSwitcher.schedule\[0\].epochs \(0\) must be an integer"),
        (
            {"schedule": SCHEDULE, "metric": "val_loss"},
            r"DomainSwitcher.metric \('val_loss'\) must contain '\{domain\}' or",
        ),
        ({"schedule": SCHEDULE, "bpb_metric": "bpb"}, r"DomainSwitcher.bpb_metric \('bpb'\) must contain '\{domain\}'"),
    ],
)
def test_switcher_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DomainSwitcher(**kwargs)


@pytest.mark.parametrize(
    ("trainer_kwargs", "schedule", "match"),
    [
        (
            {"max_epochs": 5},
            SCHEDULE,
            r"trainer.max_epochs \(5\) must equal the sum of DomainSwitcher.schedule's .*\(4\)",
        ),
        ({"limit_val_batches": 0}, SCHEDULE, r"trainer.limit_val_batches must be > 0"),
        (
            {"check_val_every_n_epoch": 2},
            SCHEDULE,
            r"trainer.check_val_every_n_epoch \(2\) must divide every stage's end epoch \[1, 3, 4\]",
        ),
        ({"max_epochs": 1}, [{"domain": "z", "epochs": 1}], r"DomainSwitcher.schedule trains on \['z'\], which the"),
    ],
)
def test_switcher_setup_errors(tmp_path, trainer_kwargs, schedule, match):
    trainer = make_trainer(tmp_path, callbacks=[DomainSwitcher(schedule)], **trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(ToyRegressor(), datamodule=ToyDomains())


def test_switcher_needs_a_datamodule_with_set_domain(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[DomainSwitcher(SCHEDULE[:1])])
    with pytest.raises(
        ValueError, match=r"DomainSwitcher needs a LightningDataModule with a set_domain\(name\) method"
    ):
        trainer.fit(BoringModel(), datamodule=BoringDataModule())


def test_switcher_runtime_errors(tmp_path):
    class WrongKey(ToyRegressor):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y, _ = batch
            self.log(f"loss_{dataloader_idx}", F.mse_loss(self(x), y), add_dataloader_idx=False)

    trainer = make_trainer(tmp_path, callbacks=[DomainSwitcher(SCHEDULE)])
    with pytest.raises(
        RuntimeError,
        match=r"'val/loss/a' was not logged by the validation at the end of stage 1 \(logged: \['loss_0'",
    ):
        trainer.fit(WrongKey(), datamodule=ToyDomains())

    class NoValidation(ToyRegressor):
        validation_step = LightningModule.validation_step  # not overridden: Lightning skips validation

    trainer = make_trainer(tmp_path, callbacks=[DomainSwitcher(SCHEDULE)])
    with pytest.raises(RuntimeError, match=r"DomainSwitcher: no validation ran at the end of stage 1 \('a', epoch 0\)"):
        trainer.fit(NoValidation(), datamodule=ToyDomains())


def test_state_dict_round_trip_and_schedule_mismatch():
    switcher = DomainSwitcher(SCHEDULE)
    switcher.domains, switcher.loss_matrix, switcher.bpb_matrix = ["a", "b", "c"], [[1.0, 2.0, 3.0]], [[1.0] * 3]
    restored = DomainSwitcher(SCHEDULE)
    restored.load_state_dict(switcher.state_dict())
    assert restored.stage == 1 and restored.loss_matrix == [[1.0, 2.0, 3.0]] and restored.domains == ["a", "b", "c"]
    other = DomainSwitcher([{"domain": "a", "epochs": 2}])
    with pytest.raises(ValueError, match=r"DomainSwitcher.schedule \[\{'domain': 'a', 'epochs': 2\}\] differs from"):
        other.load_state_dict(switcher.state_dict())
