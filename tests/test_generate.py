"""`pragnosia generate` samples from a checkpoint with the experts streamed through the slots."""

import pytest
from conftest import cpu_trainer, token_loader

from pragnosia_pl import GlobalMoE, PragnosiaLM
from pragnosia_pl.cli import main


@pytest.mark.parametrize("model_class", [PragnosiaLM, GlobalMoE])
def test_generate_from_checkpoint(tiny, tmp_path, capsys, model_class):
    extra = {"store": "disk", "store_dir": str(tmp_path / "store")} if model_class is PragnosiaLM else {}
    model = model_class(**tiny, num_experts=8, num_active_experts=2, **extra)
    trainer = cpu_trainer(tmp_path, max_steps=2)
    trainer.fit(model, train_dataloaders=token_loader(2))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    main(["generate", "--ckpt_path", str(tmp_path / "model.ckpt"), "--prompt", "hello", "--max_new_tokens", "12"])
    out = capsys.readouterr().out
    assert out.startswith("hello") and len(out.encode()) >= len("hello") + 1


def test_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt_path", str(tmp_path / "nope.ckpt")])
    err = capsys.readouterr().err
    assert "--ckpt_path" in err and "no such file" in err
