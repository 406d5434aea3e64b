"""TokenThroughput, LearningRates and StoreModelSummary with small Lightning models: what they log is what the step
did (tokens ÷ its time, the optimizers' rates), in TensorBoard and in the progress bar."""

import time

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from callbacks import LearningRates, StoreModelSummary, TokenThroughput
from callbacks.learning_rates import optimizer_learning_rates

STEP_SECONDS = 0.05


class SlowTokenModel(LightningModule):
    """A step over (B, T) token batches that takes at least STEP_SECONDS; a second, non-Lightning optimizer's rate
    is reported through ``learning_rates()``, as PragnosiaLM reports its experts'."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 8)
        self.own_lr = 0.25

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_SECONDS)
        tokens, _ = batch
        return self.embed(tokens).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.125)

    def learning_rates(self) -> dict[str, float]:
        return {"experts": self.own_lr}


def token_batches(num_batches: int = 4, batch_size: int = 4, block_size: int = 8) -> DataLoader:
    tokens = torch.randint(0, 256, (num_batches * batch_size, block_size + 1))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)


def fit(tmp_path, callbacks, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="", version=0),
        log_every_n_steps=1,
        max_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    options.update(kwargs)
    trainer = Trainer(**options)
    trainer.fit(SlowTokenModel(), train_dataloaders=token_batches())
    return trainer


def logged(tmp_path) -> dict[str, list[float]]:
    events = EventAccumulator(str(tmp_path / "version_0"))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tokens_per_second_is_the_steps_tokens_over_its_time(tmp_path):
    throughput = TokenThroughput()
    trainer = fit(tmp_path, [throughput])
    scalars = logged(tmp_path)
    assert len(scalars["train/tokens_per_s"]) == 4 and len(throughput.history) == 4
    for value, row in zip(scalars["train/tokens_per_s"], throughput.history):
        assert row["tokens"] == 4 * 8  # (B, T) = (4, 8) tokens in a batch
        assert STEP_SECONDS <= row["seconds"] < STEP_SECONDS + 1.0  # the step's sleep, and what else it did
        assert value == pytest.approx(row["tokens"] / row["seconds"], rel=1e-5)
    assert scalars["train/step_time_s"] == pytest.approx([row["seconds"] for row in throughput.history], rel=1e-5)
    assert "train/tokens_per_s" in trainer.progress_bar_metrics


def test_learning_rates_of_every_optimizer_reach_tensorboard_and_the_progress_bar(tmp_path):
    trainer = fit(tmp_path, [LearningRates()])
    scalars = logged(tmp_path)
    assert scalars["lr-SGD"] == [0.125] * 4
    assert scalars["lr-experts"] == [0.25] * 4
    assert {"lr-SGD", "lr-experts"} <= set(trainer.progress_bar_metrics)


def test_optimizer_names_follow_lightnings_learning_rate_monitor():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    first = torch.optim.AdamW([{"params": params[:1], "lr": 0.1}, {"params": params[1:2], "lr": 0.2}])
    second = torch.optim.AdamW(params[2:], lr=0.3)
    assert optimizer_learning_rates([first, second]) == {
        "lr-AdamW/pg1": 0.1,
        "lr-AdamW/pg2": 0.2,
        "lr-AdamW-1": 0.3,
    }


def test_a_bad_learning_rates_hook_names_the_module(tmp_path):
    class Bad(SlowTokenModel):
        def learning_rates(self):
            return [0.1]

    trainer = Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[LearningRates()],
        enable_progress_bar=False,
    )
    with pytest.raises(TypeError, match=r"Bad\.learning_rates\(\) must return a dict\[str, float\], got list"):
        trainer.fit(Bad(), train_dataloaders=token_batches(1))


def test_store_summary_adds_the_stores_parameters(tmp_path, capsys, caplog):
    class Stored(SlowTokenModel):
        def parameters_in_store(self):
            return {"total": 5_000_000, "active": 250_000}

    trainer = Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[StoreModelSummary()],
        enable_progress_bar=False,
    )
    with caplog.at_level("INFO"):
        trainer.fit(Stored(), train_dataloaders=token_batches(1))
    text = caplog.text + capsys.readouterr().out
    assert "5.0 M     Params in the store" in text
    assert "5.0 M     Total params, the store's included" in text  # + the embedding's 2,048
    assert "252 K     Active params per token" in text  # 2,048 + 250,000
