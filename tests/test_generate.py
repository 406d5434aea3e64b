"""`pragnosia generate` samples from a checkpoint with the experts streamed through the slots."""

import math

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


# --- sampling as Hugging Face users expect it ----------------------------------------------------------------


def trained(tiny, tmp_path, **kwargs) -> PragnosiaLM:
    model = PragnosiaLM(**tiny, num_experts=8, num_active_experts=2, expert_cache=2, **kwargs)
    cpu_trainer(tmp_path, max_steps=3).fit(model, train_dataloaders=token_loader(3))
    return model.eval()


def test_greedy_is_deterministic_and_equals_argmax_decoding_by_hand(tiny, tmp_path):
    model = trained(tiny, tmp_path)
    prompt = b"the "
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # the reference: the full forward of every position, argmax of the last
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    torch.manual_seed(0)
    first = model.generate(prompt, max_new_tokens=12, temperature=0)
    torch.manual_seed(1)
    assert model.generate(prompt, max_new_tokens=12, temperature=0) == first == bytes(tokens[len(prompt) :])
    torch.manual_seed(0)
    assert model.generate(prompt, max_new_tokens=12, top_k=1) == first  # one candidate: greedy too
    assert model.generate(prompt, max_new_tokens=12, top_p=1e-6) == first  # a nucleus of the top byte alone


def test_top_k_beyond_the_vocabulary_is_all_bytes(tiny, tmp_path):
    model = trained(tiny, tmp_path)
    torch.manual_seed(3)
    everything = model.generate(b"x", max_new_tokens=8, top_k=0)
    torch.manual_seed(3)
    assert model.generate(b"x", max_new_tokens=8, top_k=300) == everything


def test_top_p_keeps_the_smallest_set_of_bytes_that_reaches_the_mass():
    from pragnosia_pl.lm_base import _filter_logits

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()  # probabilities, sorted by hand
    kept = lambda **kw: torch.isfinite(_filter_logits(logits, **kw)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=0, top_p=0.5) == [0]  # 0.5 reaches 0.5
    assert kept(top_k=0, top_p=0.6) == [0, 1]  # 0.5 does not reach 0.6; 0.8 does
    assert kept(top_k=0, top_p=0.81) == [0, 1, 2]
    assert kept(top_k=0, top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=2, top_p=1.0) == [0, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "--temperature (-1.0) must be ≥ 0 and finite (0: greedy)"),
        (["--top_k", "-2"], "--top_k (-2) must be ≥ 0 (0: the whole vocabulary)"),
        (["--top_p", "0"], "--top_p (0.0) must be in (0, 1] (1: off)"),
        (["--top_p", "1.5"], "--top_p (1.5) must be in (0, 1] (1: off)"),
        (["--max_new_tokens", "0"], "--max_new_tokens (0) must be ≥ 1"),
        (["--device", "nope"], "--device 'nope' is not a device (cpu, cuda, cuda:1, ...)"),
        (["--num_threads", "0"], "--num_threads (0) must be ≥ 1"),
        (["--max_new_tokens", "many"], "argument --max_new_tokens: invalid int value: 'many'"),
    ],
)
def test_generate_checks_every_value_before_loading_the_checkpoint(tmp_path, capsys, args, message):
    """The checkpoint does not exist: an error about the flag shows that it was checked first."""
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt_path", str(tmp_path / "nope.ckpt"), *args])
    assert capsys.readouterr().err == f"pragnosia: error: {message}\n"


def test_generate_without_a_checkpoint_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])
    assert capsys.readouterr().err == "pragnosia: error: the following arguments are required: --ckpt_path\n"


def test_generate_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 200)", "(default: 0.8)", "(default: 1.0)", "(default: 0)"):
        assert default in out, out


# --- scoring a whole file ------------------------------------------------------------------------------------


def test_score_predicts_every_byte_once_from_its_window(tiny, tmp_path, capsys):
    model = trained(tiny, tmp_path, store="disk", store_dir=str(tmp_path / "store"))
    text = b"import os\nprint(os.getcwd())\n# a file of 51 bytes, not a multiple\n"[:51]
    block = 16
    stream = [10, *text]
    bits = 0.0
    with torch.no_grad():  # the reference: each byte from the bytes before it in its window, one forward per byte
        for i in range(len(text)):
            window_start = (i // block) * block
            context = torch.tensor([stream[window_start : i + 1]])
            bits -= torch.log_softmax(model(context)[0, -1].float(), -1)[text[i]].item() / math.log(2)
    bpb, num_bytes = model.score(text, block_size=block, batch_size=2)
    assert num_bytes == 51 and bpb == pytest.approx(bits / 51, rel=1e-5), (bpb, bits / 51)

    (tmp_path / "mine.txt").write_bytes(text)
    trainer = cpu_trainer(tmp_path, max_steps=3)
    trainer.fit(model, train_dataloaders=token_loader(3))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    expected, _ = model.eval().score(text, block_size=block)
    main(["score", "--ckpt_path", str(tmp_path / "model.ckpt"), "--block_size", str(block), str(tmp_path / "mine.txt")])
    assert (
        capsys.readouterr().out == f"{tmp_path / 'mine.txt'}: {expected:.4f} bits per byte (51 bytes, windows of 16)\n"
    )


def test_score_checks_its_flags_before_loading(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    for args, message in [
        (["--block_size", "0", "README.md"], f"--block_size (0) must be between 1 and {MAX_LEN}"),
        ([str(tmp_path / "missing.txt")], f"files: cannot read {tmp_path / 'missing.txt'}: No such file or directory"),
        ([str(tmp_path / "empty.txt")], f"files: {tmp_path / 'empty.txt'} is empty"),
    ]:
        with pytest.raises(SystemExit):
            main(["score", "--ckpt_path", str(tmp_path / "nope.ckpt"), *args])
        assert capsys.readouterr().err == f"pragnosia: error: {message}\n"
