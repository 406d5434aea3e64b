"""`pragnosia generate` samples from a checkpoint with the experts streamed through the slots."""

import pytest
import torch
from conftest import cpu_trainer, token_loader

from pragnosia_pl import GlobalMoE, PragnosiaLM
from pragnosia_pl.cli import main
from pragnosia_pl.lm_base import MAX_LEN


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


def test_generation_sees_only_the_last_max_len_bytes(tiny):
    """A context longer than the rotary table is cropped to its last MAX_LEN bytes, not refused."""
    model = GlobalMoE(**tiny, num_experts=4, num_active_experts=2).eval()
    prompt = bytes(range(256)) * (MAX_LEN // 256) + b"abc"  # MAX_LEN + 3 bytes
    torch.manual_seed(0)
    long = model.generate(prompt, max_new_tokens=3)
    torch.manual_seed(0)
    assert long == model.generate(prompt[-MAX_LEN:], max_new_tokens=3)
    with pytest.raises(ValueError, match=rf"a sequence of {MAX_LEN + 3} tokens exceeds .* data\.block_size"):
        model(torch.tensor(list(prompt))[None])
