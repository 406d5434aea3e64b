"""Tokenizers: bytes, a `tokenizers` JSON file and a BPE trained on the training split give exact round trips; the
BPE is cached and reused; `val/bpb` stays bits per byte; the vocabulary flows from `data.tokenizer` to the model; the
checkpoint carries the tokenizer and `pragnosia generate` decodes with it."""

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_trainer

from pragnosia_pl import DenseLM, GlobalMoE, PragnosiaLM
from pragnosia_pl import tokenizer as tokenizer_module
from pragnosia_pl.cli import main, run_cli
from pragnosia_pl.data import TextDomains
from pragnosia_pl.tokenizer import ByteTokenizer, load_tokenizer_file, tokenizer_from_json, train_bpe

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY_RUN = [
    "--model.d_model", "16", "--model.n_shared_layers", "1", "--model.n_heads", "2",
    "--model.num_experts", "4", "--data.block_size", "32", "--data.batch_size", "4",
    "--data.max_bytes_per_domain", "20000", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
    "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false",
]  # fmt: skip
SAMPLES = [
    b"",
    b"def f(x):\n    return x ** 2  # the square\n",
    "na\u00efve caf\u00e9, \u2211 \U0001f600\r\n\t".encode(),
    "\u00e9\u2211".encode()[:3],  # ends inside a character
    b"\xff\xfe\x80 lone bytes \xc3",  # not UTF-8
    bytes(range(256)),
]


def unique_lines(count: int, salt: str) -> str:
    """Lines that each hold 40 characters no other line has, and words that repeat (for the BPE to merge)."""
    return "".join(
        f"{i:05d} {hashlib.sha256(f'{salt}{i}'.encode()).hexdigest()[:40]} word{i % 7} the fox\n" for i in range(count)
    )


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "code.txt").write_text(unique_lines(400, "code"))
    (tmp_path / "prose.txt").write_text(unique_lines(300, "prose"))
    return tmp_path


def make(corpus, tokenizer="bpe:300", **kwargs):
    kwargs = dict(dict(block_size=32, batch_size=4, val_fraction=0.1, cache_dir=str(corpus / "cache")), **kwargs)
    domains = {"code": str(corpus / "code.txt"), "prose": str(corpus / "prose.txt")}
    dm = TextDomains(domains, tokenizer=tokenizer, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def bpe_trainings(monkeypatch):
    """The vocabulary sizes of every BPE trained while the test runs."""
    sizes = []
    train = tokenizer_module.train_bpe

    def counted(texts, vocab_size):
        sizes.append(vocab_size)
        return train(texts, vocab_size)

    monkeypatch.setattr(tokenizer_module, "train_bpe", counted)
    return sizes


# --- round trips -----------------------------------------------------------------------------------------------


def tokenizer_file(tmp_path) -> str:
    """A GPT-2 style byte-level BPE written by hand with the `tokenizers` library (not by our trainer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("r", "e"), ("Ġ", "f"), ("Ġf", "o"), ("Ġfo", "x")]
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    hf = Tokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    return path


@pytest.mark.parametrize("kind", ["bytes", "json", "bpe"])
def test_round_trip_gives_the_bytes_back(kind, corpus, tmp_path):
    if kind == "bytes":
        tokenizer = ByteTokenizer()
    elif kind == "json":
        tokenizer = load_tokenizer_file(tokenizer_file(tmp_path))
        assert tokenizer.vocab_size == 256 + 7 + 1
        assert tokenizer.encode(b" the fox") == [256 + 2, 256 + 6]
        assert tokenizer.decode([256 + 7]) == b"<|endoftext|>"
    else:
        tokenizer = train_bpe([(corpus / "code.txt").read_bytes()], 300)
        assert tokenizer.vocab_size == 300
        text = b"word1 the fox\n" * 4
        assert len(tokenizer.encode(text)) < len(text) / 2  # it merged
    rebuilt = tokenizer_from_json(tokenizer.to_json())
    for sample in [*SAMPLES, (corpus / "prose.txt").read_bytes()]:
        ids = tokenizer.encode(sample)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == sample
        assert int(tokenizer.byte_lengths[ids].sum()) == len(sample)
        assert rebuilt.encode(sample) == ids
    if kind == "bytes":
        assert tokenizer.encode(bytes(range(256))) == list(range(256))
        assert torch.equal(tokenizer.byte_lengths, torch.ones(256, dtype=torch.long))


def test_datamodule_tokens_decode_to_the_split_text_and_bpe_never_sees_validation(corpus, monkeypatch):
    trained_on = []
    train = tokenizer_module.train_bpe
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda texts, V: train(trained_on.extend(texts) or texts, V))
    dm = make(corpus)
    assert dm.vocab_size == dm.tokenizer.vocab_size == 300
    training_text = b"".join(trained_on)
    for key in dm.domain_names:
        train_tokens, val_tokens = dm._train[key].tokens, dm._val[key].tokens
        assert train_tokens.dtype == torch.uint16 and int(train_tokens.long().max()) >= 256
        train_text, val_text = dm.tokenizer.decode(train_tokens.tolist()), dm.tokenizer.decode(val_tokens.tolist())
        assert train_text in training_text  # the blocks of a domain split by blocks form one run here or there
        pieces = [val_text[i : i + 40] for i in range(0, len(val_text) - 40, 40)]
        assert pieces and not any(piece in training_text for piece in pieces)
        assert len(dm.tokenizer.decode(val_tokens.tolist())) < 1.2 * dm.val_fraction * dm.summary()[key]["bytes"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


# --- the BPE and the encoded splits are cached -------------------------------------------------------------------


def test_bpe_is_cached_per_training_text_and_size(corpus, bpe_trainings):
    first = make(corpus)
    files = sorted((corpus / "cache" / "tokenizers").iterdir())
    assert bpe_trainings == [300] and len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = make(corpus)
    assert bpe_trainings == [300] and files[0].stat().st_mtime_ns == mtime  # not retrained, not rewritten
    assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert torch.equal(again._train["code"].tokens.long(), first._train["code"].tokens.long())

    larger = make(corpus, tokenizer="bpe:320")
    assert bpe_trainings == [300, 320]
    assert len(larger.tokenizer.tokenizer.get_vocab()) == 320
    # the encoded splits are keyed on the tokenizer: the larger vocabulary's tokens, not the cached smaller one's
    assert len(larger._train["code"].tokens) < len(first._train["code"].tokens)
    assert larger.tokenizer.decode(larger._train["code"].tokens.tolist()) == first.tokenizer.decode(
        first._train["code"].tokens.tolist()
    )

    (corpus / "code.txt").write_text(unique_lines(400, "changed"))
    make(corpus)
    assert bpe_trainings == [300, 320, 300]  # the training text changed


def test_a_short_bpe_is_padded_to_its_size(corpus):
    dm = make(corpus, tokenizer="bpe:60000")
    assert dm.vocab_size == dm.tokenizer.vocab_size == len(dm.tokenizer.byte_lengths) == 60000
    assert len(dm.tokenizer.tokenizer.get_vocab()) < 60000
    assert dm._train["code"].tokens.dtype == torch.uint16


# --- bits per byte -----------------------------------------------------------------------------------------------


def hand_figures(model, dm) -> dict[str, tuple[float, int, int]]:
    """Per validation domain and over all (key ""): the summed cross-entropy of the target tokens, their count and
    the bytes of their decoded text, computed by hand."""
    figures = {}
    with torch.no_grad():
        for key, loader in zip(dm.val_domain_names, dm.val_dataloader()):
            loss_sum, tokens, num_bytes = 0.0, 0, 0
            for x, y in loader:
                loss_sum += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
                tokens += y.numel()
                num_bytes += len(dm.tokenizer.decode(y.flatten().tolist()))
            figures[key] = (loss_sum, tokens, num_bytes)
    figures[""] = tuple(map(sum, zip(*figures.values())))
    return figures


@pytest.mark.parametrize("tokenizer", ["bpe:300", "bytes"])
def test_val_bpb_is_the_token_loss_over_the_bytes(corpus, tiny, tmp_path, tokenizer):
    dm = make(corpus, tokenizer=tokenizer)
    model = GlobalMoE(**tiny, num_experts=4, num_active_experts=2, vocab_size=dm.vocab_size).eval()
    metrics = cpu_trainer(tmp_path).validate(model, datamodule=dm, verbose=False)[0]
    for key, (loss_sum, tokens, num_bytes) in hand_figures(model, dm).items():
        suffix = f"/{key}" if key else ""
        assert metrics[f"val/loss{suffix}"] == pytest.approx(loss_sum / tokens, rel=1e-5)
        assert metrics[f"val/bpb{suffix}"] == pytest.approx(loss_sum / (math.log(2) * num_bytes), rel=1e-5)
        if tokenizer == "bytes":
            assert num_bytes == tokens
            today = torch.tensor(metrics[f"val/loss{suffix}"], dtype=torch.float32) / math.log(2)
            assert metrics[f"val/bpb{suffix}"] == today.item()  # today's figure, bit for bit
        else:
            assert num_bytes > 1.2 * tokens  # so the conversion matters


# --- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("wordpiece", r"data\.tokenizer \('wordpiece'\) must be bytes, bpe:<vocab size> \(e\.g\. bpe:8192\) or a path"),
        ("bpe:256", r"data\.tokenizer \('bpe:256'\): bpe:<vocab size> needs a vocabulary > 256"),
        ("bpe:lots", r"data\.tokenizer \('bpe:lots'\): bpe:<vocab size> needs a vocabulary > 256"),
        ("{tmp}/notes.json", r"data\.tokenizer \('.*notes\.json'\) is not a tokenizers JSON file"),
        ("{tmp}/wordlevel.json", r"data\.tokenizer: .*wordlevel\.json is not a byte-level tokenizer"),
        ("{tmp}/pieces.json", r"data\.tokenizer: .*pieces\.json is not a byte-level tokenizer \(token '▁the' is not"),
        ("{tmp}/prefix.json", r"data\.tokenizer: .*prefix\.json does not give back the text it encodes"),
    ],
)
def test_a_bad_tokenizer_is_refused_naming_data_tokenizer(value, match, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    (tmp_path / "notes.json").write_text(json.dumps({"notes": "not a tokenizer"}))
    Tokenizer(models.WordLevel({"the": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "wordlevel.json"))
    Tokenizer(models.WordLevel({"▁the": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "pieces.json"))
    prefix = Tokenizer.from_file(tokenizer_file(tmp_path))
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    prefix.save(str(tmp_path / "prefix.json"))
    with pytest.raises(ValueError, match=match):
        TextDomains(tokenizer=value.format(tmp=tmp_path))


def test_a_bad_tokenizer_is_one_line_from_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pragnosia"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICKSTART), "--data.tokenizer", "bpe-8k"])
    assert capsys.readouterr().err == (
        "pragnosia: error: data.tokenizer ('bpe-8k') must be bytes, bpe:<vocab size> (e.g. bpe:8192) or a path to a "
        "tokenizers JSON file\n"
    )


@pytest.mark.parametrize("model_class", [PragnosiaLM, GlobalMoE, DenseLM])
def test_vocab_size_flows_from_data_to_the_model(model_class, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pragnosia"])
    args = [
        "--model", f"pragnosia_pl.{model_class.__name__}", "--model.d_model", "16", "--model.n_heads", "2",
        "--data", "pragnosia_pl.TextDomains", "--trainer.logger", "false",
    ]  # fmt: skip
    cli = run_cli([*args, "--data.tokenizer", "bpe:300"], run=False)
    assert isinstance(cli.model, model_class)
    assert cli.model.backbone.embed.weight.shape == (300, 16) and cli.model.hparams.vocab_size == 300
    assert run_cli(args, run=False).model.backbone.embed.weight.shape == (256, 16)
    with pytest.raises(ValueError, match=r"model\.vocab_size \(300\) is set from the data \(256\): choose data\.tok"):
        run_cli([*args, "--model.vocab_size", "300"], run=False)


def test_a_model_refuses_data_of_another_vocabulary(corpus, tiny, tmp_path):
    dm = make(corpus)
    model = GlobalMoE(**tiny, num_experts=4, num_active_experts=2)  # 256 ids
    with pytest.raises(ValueError, match=r"model\.vocab_size \(256\) must equal the vocabulary of data\.tokenizer"):
        cpu_trainer(tmp_path).validate(model, datamodule=dm, verbose=False)


# --- checkpoints and generation ----------------------------------------------------------------------------------


def test_checkpoint_carries_the_tokenizer_and_generate_uses_it(corpus, tiny, tmp_path, capsys, monkeypatch):
    dm = make(corpus)
    model = GlobalMoE(**tiny, num_experts=4, num_active_experts=2, vocab_size=dm.vocab_size)
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(tmp_path / "model.ckpt", weights_only=False)["tokenizer"]
    assert tokenizer_from_json(saved).fingerprint() == dm.tokenizer.fingerprint()

    loaded = GlobalMoE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.tokenizer.fingerprint() == dm.tokenizer.fingerprint()
    inputs = []
    forward = GlobalMoE.forward
    monkeypatch.setattr(GlobalMoE, "forward", lambda self, tokens: inputs.append(tokens) or forward(self, tokens))
    torch.manual_seed(0)
    sample = loaded.generate(b"def return the fox", max_new_tokens=6)
    assert inputs[0][0].tolist() == dm.tokenizer.encode(b"def return the fox")
    assert [tokens.size(1) for tokens in inputs] == [inputs[0].size(1) + i for i in range(6)]
    assert sample.startswith(dm.tokenizer.decode(inputs[-1][0, inputs[0].size(1) :].tolist()))  # + the last token

    main(["generate", "--ckpt_path", str(tmp_path / "model.ckpt"), "--prompt", "def ", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("def ")

    other = make(corpus, tokenizer="bpe:310")
    resumed = GlobalMoE(**tiny, num_experts=4, num_active_experts=2, vocab_size=300)
    with pytest.raises(ValueError, match=r"model\.vocab_size \(300\) must equal the vocabulary of data\.tokenizer"):
        cpu_trainer(tmp_path, max_steps=2).fit(resumed, datamodule=other, ckpt_path=tmp_path / "model.ckpt")


def test_resuming_with_another_tokenizer_of_the_same_size_is_refused(corpus, tiny, tmp_path):
    dm = make(corpus)
    model = GlobalMoE(**tiny, num_experts=4, num_active_experts=2, vocab_size=300)
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    (corpus / "code.txt").write_text(unique_lines(400, "another text"))
    other = make(corpus)
    assert other.tokenizer.fingerprint() != dm.tokenizer.fingerprint()
    resumed = GlobalMoE(**tiny, num_experts=4, num_active_experts=2, vocab_size=300)
    with pytest.raises(ValueError, match=r"data\.tokenizer is not the tokenizer this checkpoint was trained with"):
        cpu_trainer(tmp_path, max_steps=2).fit(resumed, datamodule=other, ckpt_path=tmp_path / "model.ckpt")


# --- the recipe ---------------------------------------------------------------------------------------------------


def test_fit_trains_the_bpe_once_and_reuses_it(tmp_path, monkeypatch, bpe_trainings):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pragnosia"])
    monkeypatch.setenv("PRAGNOSIA_CACHE", str(tmp_path / "cache"))
    args = ["fit", "--config", str(QUICKSTART), *TINY_RUN, "--data.tokenizer", "bpe:300"]
    first = run_cli([*args, "--trainer.default_root_dir", "a"])
    assert bpe_trainings == [300] and first.model.backbone.embed.weight.shape[0] == 300
    cached = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache" / "tokenizers").iterdir()}
    cached.update({path: path.stat().st_mtime_ns for path in (tmp_path / "cache" / "tokens").iterdir()})
    assert len(cached) == 1 + 6  # the BPE; three splits (train, val, test) of two domains; no temporary file left
    second = run_cli([*args, "--trainer.default_root_dir", "b"])
    assert bpe_trainings == [300]  # reused: not trained again
    assert {path: path.stat().st_mtime_ns for path in cached} == cached
    assert second.datamodule.tokenizer.fingerprint() == first.datamodule.tokenizer.fingerprint()
    checkpoint = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert json.loads(checkpoint["tokenizer"])["vocab_size"] == 300
    loaded = PragnosiaLM.load_from_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert loaded.tokenizer.fingerprint() == second.datamodule.tokenizer.fingerprint()
    assert "val/bpb" in second.trainer.callback_metrics
