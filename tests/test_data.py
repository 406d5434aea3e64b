import hashlib
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn
from torch.utils.data import SequentialSampler

from pragnosia_pl import domains as domains_module
from pragnosia_pl.data import EpochSampler, TextDomains

# Lowercase-only text in one domain, uppercase/digits-only in the other, so a block tells its domain.
ALPHA_ONE = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60))
ALPHA_TWO = "".join(f"{i} sphinx of black quartz, judge my vow\n" for i in range(40))
LATIN1 = b"caf\xe9 na\xefve \xff\xfe bytes\n" * 30
BETA = "".join(f"ROW {i} PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS\n" for i in range(80))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text(ALPHA_ONE)
    (tmp_path / "a" / "two.txt").write_text(ALPHA_TWO)
    (tmp_path / "a" / "empty.txt").write_text("")
    (tmp_path / "a" / "latin1.txt").write_bytes(LATIN1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.md").write_text(BETA)
    return tmp_path


def make(corpus, setup=True, **kwargs):
    kwargs.setdefault("domains", {"alpha": str(corpus / "a" / "*.txt"), "beta": [str(corpus / "b" / "notes.md")]})
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("val_fraction", 0.1)
    kwargs.setdefault("cache_dir", str(corpus / "cache"))
    dm = TextDomains(**kwargs)
    if setup:
        dm.setup("fit")
    return dm


def alpha_stream() -> bytes:
    # sorted file order (empty.txt skipped), non-UTF-8 bytes replaced, documents joined by a blank line
    return b"\n\n".join([LATIN1.decode("utf-8", errors="replace").encode(), ALPHA_ONE.encode(), ALPHA_TWO.encode()])


def block_starts(dataset) -> set[int]:
    return {int(b) for b in dataset.blocks}


def test_reads_files_as_bytes_with_replacement_and_skips_empty(corpus):
    dm = make(corpus)
    tokens = dm.val_dataloader()[0].dataset.tokens
    assert tokens.dtype == torch.uint8
    assert bytes(tokens.numpy()) == alpha_stream()
    assert dm.summary()["alpha"]["bytes"] == len(alpha_stream())
    assert dm.vocab_size == 256


def test_batches_are_shifted_long_blocks(corpus):
    dm = make(corpus)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    val = dm.val_dataloader()[0].dataset
    vx, vy = val[0]
    start = int(val.blocks[0]) * 17
    assert bytes(vx.tolist()) + bytes(vy[-1:].tolist()) == alpha_stream()[start : start + 17]


def test_split_is_deterministic_disjoint_and_sized(corpus):
    dm, again, other = make(corpus, test_fraction=0.05), make(corpus, test_fraction=0.05), make(corpus, seed=1)
    for i, name in enumerate(dm.val_domain_names):
        train, val, test = dm._train[name], dm.val_dataloader()[i].dataset, dm.test_dataloader()[i].dataset
        num_blocks = len(val.tokens) // 17
        assert not block_starts(train) & block_starts(val)
        assert not (block_starts(train) | block_starts(val)) & block_starts(test)
        assert block_starts(train) | block_starts(val) | block_starts(test) == set(range(num_blocks))
        assert len(val) == math.ceil(0.1 * num_blocks) and len(test) == math.ceil(0.05 * num_blocks)
        assert block_starts(again.val_dataloader()[i].dataset) == block_starts(val)
        assert block_starts(again.test_dataloader()[i].dataset) == block_starts(test)
        assert block_starts(other.val_dataloader()[i].dataset) != block_starts(val)
        assert dm.num_tokens(name, "train") == len(train) * 16
        assert dm.num_tokens(name, "val") == len(val) * 16
        assert dm.num_tokens(name, "test") == len(test) * 16


def block_texts(dataset) -> set[bytes]:
    return {bytes(x.tolist()) + bytes(y[-1:].tolist()) for x, y in (dataset[i] for i in range(len(dataset)))}


def test_test_split_leaves_validation_as_it_was_and_shares_no_block_of_text(corpus):
    """The validation blocks are those of a split without a test share (as before the test split existed); the
    test blocks come out of the training blocks, and no test block's text is a training or validation block's (on
    text whose blocks are all different: real text repeats itself, e.g. licence headers)."""
    unique = "".join(hashlib.sha256(str(i).encode()).hexdigest() + "\n" for i in range(100))
    (corpus / "unique.txt").write_text(unique)
    domains = {"alpha": str(corpus / "unique.txt"), "beta": [str(corpus / "b" / "notes.md")]}
    without, dm = make(corpus, domains=domains, test_fraction=0.0), make(corpus, domains=domains, test_fraction=0.2)
    assert len(block_texts(without._train["alpha"])) == len(without._train["alpha"])  # no text repeats
    for i, name in enumerate(dm.val_domain_names):
        val, test = dm.val_dataloader()[i].dataset, dm.test_dataloader()[i].dataset
        assert block_starts(val) == block_starts(without.val_dataloader()[i].dataset)
        assert block_starts(test) | block_starts(dm._train[name]) == block_starts(without._train[name])
        if name == "alpha":
            assert len(test) > 0 and not block_texts(test) & (block_texts(val) | block_texts(dm._train[name]))
    with pytest.raises(ValueError, match=r"data\.test_fraction is 0: there is no test split"):
        without.test_dataloader()


def test_max_bytes_per_domain_truncates_in_file_order(corpus):
    dm = make(corpus, max_bytes_per_domain=500)
    assert bytes(dm.val_dataloader()[0].dataset.tokens.numpy()) == alpha_stream()[:500]
    assert dm.summary()["beta"]["bytes"] == 500


def test_set_domain_restricts_training_batches(corpus):
    dm = make(corpus)
    has_lower = []
    for name in ("beta", "alpha", None):
        dm.set_domain(name)
        rows = torch.cat([x for x, _ in dm.train_dataloader()])
        has_lower.append(((rows >= ord("a")) & (rows <= ord("z"))).any(dim=1))
    beta, alpha, both = has_lower
    assert not beta.any()
    assert alpha.float().mean() > 0.9
    assert 0 < both.float().mean() < 1
    assert dm.val_domain_names == ["alpha", "beta"]
    assert len(dm.val_dataloader()) == 2


def test_val_loaders_one_per_domain_in_order_unshuffled(corpus):
    dm = make(corpus)
    loaders = dm.val_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [dm.summary()[n]["val_blocks"] for n in dm.val_domain_names]
    assert all(isinstance(loader.sampler, SequentialSampler) and not loader.drop_last for loader in loaders)
    assert bytes(loaders[1].dataset.tokens.numpy()) == BETA.encode()


def test_sampler_depends_only_on_seed_and_epoch(corpus):
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(2)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == first
    assert sorted(first) == list(range(50))
    sampler.set_epoch(3)
    assert list(sampler) != first
    assert list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))

    dm = make(corpus)
    loaders = [dm.train_dataloader(), dm.train_dataloader()]
    for loader in loaders:
        loader.sampler.set_epoch(5)
    batches = [[x for x, _ in loader] for loader in loaders]
    assert len(batches[0]) == len(loaders[0].dataset) // 4
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_state_dict_carries_the_active_domain(corpus):
    dm = make(corpus)
    dm.set_domain("beta")
    resumed = make(corpus)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.active_domain == "beta"
    assert len(resumed.train_dataloader().dataset) == len(dm._train["beta"])


def test_cache_is_reused_and_keyed_on_file_changes(corpus):
    make(corpus)
    cached = sorted(os.listdir(corpus / "cache" / "generator"))
    make(corpus)
    assert sorted(os.listdir(corpus / "cache" / "generator")) == cached
    notes = corpus / "b" / "notes.md"
    notes.write_text(BETA + "APPENDED\n")
    os.utime(notes, ns=(notes.stat().st_atime_ns, notes.stat().st_mtime_ns + 10**9))
    dm = make(corpus)
    assert bytes(dm.val_dataloader()[1].dataset.tokens.numpy()).endswith(b"APPENDED\n")


def test_domain_spec_parses_with_jsonargparse():
    parser = ArgumentParser()
    parser.add_class_arguments(TextDomains, "data")
    config = parser.parse_args(['--data.domains={"a": ["x/*.py", "y.txt"], "b": "stdlib-code"}'])
    assert config.data.domains == {"a": ["x/*.py", "y.txt"], "b": "stdlib-code"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, r"data\.block_size \(0\) must be ≥ 1"),
        ({"batch_size": 0}, r"data\.batch_size \(0\) must be ≥ 1"),
        ({"val_fraction": 0.0}, r"data\.val_fraction \(0\.0\) must be in \(0, 1\)"),
        ({"val_fraction": 1.0}, r"data\.val_fraction \(1\.0\) must be in \(0, 1\)"),
        ({"max_bytes_per_domain": 0}, r"data\.max_bytes_per_domain \(0\) must be ≥ 1 or null"),
        ({"num_workers": -1}, r"data\.num_workers \(-1\) must be ≥ 0"),
        ({"domains": {}}, r"data\.domains is empty"),
    ],
)
def test_bad_arguments_name_their_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDomains(**kwargs)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("{root}/nope/*.py", r"data\.domains\.code: no files match '.*/nope/\*\.py'"),
        (["{root}/a/empty.txt"], r"data\.domains\.code: files hold no text"),
        ("stdlb-code", r"data\.domains\.code: 'stdlb-code' is neither a preset .*presets: stdlib-code, stdlib-docs"),
        ([], r"data\.domains\.code: the list of files is empty"),
        ("{root}/b/notes.md", r"data\.domains\.code: .* block\(s\) .*data\.block_size \(4000\) is too large"),
    ],
)
def test_bad_domains_name_their_key(corpus, spec, match):
    spec = [s.format(root=corpus) for s in spec] if isinstance(spec, list) else spec.format(root=corpus)
    with pytest.raises(ValueError, match=match):
        make(corpus, domains={"code": spec}, block_size=4000)


def test_missing_licenses_and_small_or_unknown_selections(corpus, monkeypatch):
    monkeypatch.setattr(domains_module, "_LICENSES_DIR", str(corpus / "no-licenses"))
    with pytest.raises(ValueError, match=r"data\.domains\.legal: preset 'licenses' reads .*no-licenses"):
        make(corpus, domains={"legal": "licenses"})
    dm = make(corpus)
    with pytest.raises(ValueError, match=r"unknown domain 'gamma'; domains: alpha, beta"):
        dm.set_domain("gamma")
    with pytest.raises(ValueError, match=r"unknown split 'eval'; splits: train, val, test"):
        dm.num_tokens("alpha", "eval")
    with pytest.raises(RuntimeError, match=r"call setup\(\) first"):
        TextDomains(cache_dir=str(corpus / "cache")).train_dataloader()
    dm = make(corpus, batch_size=500)
    with pytest.raises(ValueError, match=r"data\.batch_size \(500\) exceeds the \d+ training blocks of alpha, beta"):
        dm.train_dataloader()


class BatchRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, x.clone()))
        return self.weight * x.float().mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val/x", batch[0].float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(corpus, dm, max_epochs, run, ckpt_path=None):
    model = BatchRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        default_root_dir=corpus / run,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=corpus / run / "ckpt", save_top_k=-1)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_trainer_sets_epochs_and_resume_repeats_batches_and_domain(corpus):
    dm = make(corpus, setup=False, seed=7)
    dm.set_domain("beta")
    seen = fit(corpus, dm, max_epochs=2, run="first")
    expected = [dm.train_dataloader().dataset[i][0] for i in list(EpochSampler(len(dm._train["beta"]), 7))[:12]]
    assert torch.equal(torch.cat([x for epoch, x in seen if epoch == 0]), torch.stack(expected))
    assert not torch.equal(seen[0][1], seen[3][1])

    resumed = make(corpus, setup=False, seed=7)
    replay = fit(
        corpus, resumed, max_epochs=2, run="resumed", ckpt_path=corpus / "first" / "ckpt" / "epoch=0-step=3.ckpt"
    )
    assert resumed.active_domain == "beta"
    assert [epoch for epoch, _ in replay] == [1, 1, 1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(replay, seen[3:]))


def test_real_presets_small(tmp_path):
    code_files = domains_module.resolve_domain("code", "stdlib-code")
    assert any(f.path.endswith(os.sep + "os.py") for f in code_files)
    assert code_files == sorted(code_files, key=lambda f: f.path)
    skipped = {"test", "tests", "idle_test", "encodings", "site-packages"}
    assert not any(skipped & set(f.path.split(os.sep)) for f in code_files)

    dm = TextDomains(block_size=64, batch_size=8, max_bytes_per_domain=100_000, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.val_domain_names == ["code", "prose"]
    code, prose = (bytes(loader.dataset.tokens.numpy()) for loader in dm.val_dataloader())
    assert len(code) == len(prose) == 100_000
    assert b"def " in code and b"import " in code
    assert b"topics = {" not in prose and b"statement" in prose
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 64)


@pytest.mark.skipif(not os.path.isdir("/usr/share/common-licenses"), reason="no /usr/share/common-licenses")
def test_licenses_preset(tmp_path):
    dm = TextDomains({"legal": "licenses"}, block_size=64, max_bytes_per_domain=20_000, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert b"License" in bytes(dm.val_dataloader()[0].dataset.tokens.numpy())


def test_pydoc_topics_without_prose_hold_no_text(tmp_path):
    topics = tmp_path / "topics.py"
    topics.write_text("topics = {}\n")
    sources = [domains_module.Source(str(topics), "pydoc-topics")]
    with pytest.raises(ValueError, match=r"data\.domains\.docs: files hold no text"):
        domains_module.load_domain_bytes("docs", sources, None, str(tmp_path / "cache"))


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("error:.*dataloader is not resumable")  # Lightning knows the loader resumes
@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_repeats_the_remaining_batches(corpus, num_workers):
    def run(name, max_steps, ckpt_path=None, batch_size=4):
        dm = make(corpus, setup=False, seed=3, num_workers=num_workers, batch_size=batch_size)
        model = BatchRecorder()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            limit_val_batches=0,
            default_root_dir=corpus / name,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[
                pl.callbacks.ModelCheckpoint(dirpath=corpus / name / "ckpt", every_n_train_steps=2, save_top_k=-1)
            ],
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return [x for _, x in model.seen], trainer.num_training_batches

    straight, per_epoch = run("straight", max_steps=8)
    assert per_epoch > 4  # step 2 is mid-epoch
    resumed, _ = run("resumed", max_steps=8, ckpt_path=corpus / "straight" / "ckpt" / "epoch=0-step=2.ckpt")
    assert len(resumed) == 6 and all(torch.equal(a, b) for a, b in zip(resumed, straight[2:]))
    with pytest.warns(UserWarning, match=r"training data had .*'batch_size': 4.* this run's has .*'batch_size': 2"):
        run("other", max_steps=3, ckpt_path=corpus / "straight" / "ckpt" / "epoch=0-step=2.ckpt", batch_size=2)


def python_tree(prefix, names):
    """Files named ``names`` under ``<prefix>/lib/site-packages``, each a block-sized line naming itself, repeated."""
    library = prefix / "lib" / "site-packages"
    for name in names:
        path = library / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {name} {'=' * 40}\n" * 20)
    (library / "pkg" / "__pycache__").mkdir(parents=True, exist_ok=True)
    (library / "pkg" / "__pycache__" / "cached.py").write_text("# never read\n" * 20)
    (library / "pkg" / "notes.txt").write_text("# not python\n" * 20)
    return library


def split_names(monkeypatch, tmp_path, prefix, library, **kwargs):
    """(train names, val names, test names): the files whose lines appear in each split's bytes."""
    sources = lambda: domains_module.python_code_sources([prefix], [library])  # noqa: E731
    monkeypatch.setitem(domains_module.PRESETS, "python-code", sources)
    kwargs = dict(dict(block_size=16, batch_size=2, val_fraction=0.25, cache_dir=str(tmp_path / "cache")), **kwargs)
    dm = TextDomains({"code": "python-code"}, **kwargs)
    dm.setup("fit")
    streams = [bytes(dm._train["code"].tokens.numpy()), bytes(dm.val_dataloader()[0].dataset.tokens.numpy())]
    streams.append(bytes(dm._test["code"].tokens.numpy()) if len(dm._test["code"]) else b"")
    return [{line.split()[1] for line in s.decode().splitlines() if line.startswith("# ")} for s in streams], dm


NAMES = [f"pkg/mod{i:02d}.py" for i in range(40)] + ["other/deep/x.py", "top.py"]


def test_python_code_splits_by_file_with_a_stable_hash_of_the_relative_name(tmp_path, monkeypatch):
    library = python_tree(tmp_path / "one", NAMES)
    (train, val, test), dm = split_names(monkeypatch, tmp_path, tmp_path / "one", library, test_fraction=0.25)
    assert train and val and test and not train & val and not (train | val) & test
    assert train | val | test == set(NAMES)  # not __pycache__, not .txt
    # the reference: sha256 of the name relative to site-packages, bytes 8..16 as a fraction
    coordinate = {n: int.from_bytes(hashlib.sha256(n.encode()).digest()[8:16], "big") / 2**64 for n in NAMES}
    assert val == {n for n, c in coordinate.items() if c < 0.25}
    assert test == {n for n, c in coordinate.items() if 0.25 <= c < 0.5}
    assert dm.summary()["code"]["val_blocks"] == len(dm.val_dataloader()[0].dataset) > 0
    assert dm.summary()["code"]["test_blocks"] == len(dm.test_dataloader()[0].dataset) > 0
    (_, val_alone, no_test), _ = split_names(monkeypatch, tmp_path, tmp_path / "one", library, test_fraction=0.0)
    assert val_alone == val and not no_test  # the validation files do not depend on the test share

    # elsewhere on disk, files created in another order, one more file: no file changes sides
    library = python_tree(tmp_path / "elsewhere" / "two", list(reversed(NAMES)) + ["pkg/new.py"])
    (train_two, val_two, test_two), _ = split_names(
        monkeypatch, tmp_path, tmp_path / "elsewhere" / "two", library, test_fraction=0.25
    )
    new = {"pkg/new.py"}
    assert val_two - new == val and train_two - new == train and test_two - new == test


def test_python_code_names_are_relative_to_the_deepest_library_folder(tmp_path):
    library = python_tree(tmp_path / "prefix", ["pkg/a.py", "pkg/b.py"])
    (tmp_path / "prefix" / "bin").mkdir()
    (tmp_path / "prefix" / "bin" / "tool.py").write_text("print()\n")
    sources = domains_module.python_code_sources([tmp_path / "prefix"], [library])
    assert sorted(s.name for s in sources) == ["bin/tool.py", "pkg/a.py", "pkg/b.py"]
    assert sources == domains_module.python_code_sources([tmp_path / "prefix", library], [library])  # listed once


def test_python_code_cap_is_shared_between_the_splits(tmp_path, monkeypatch):
    library = python_tree(tmp_path / "one", NAMES)
    (train, val, test), dm = split_names(monkeypatch, tmp_path, tmp_path / "one", library, max_bytes_per_domain=4000)
    assert dm.summary()["code"]["bytes"] <= 4000
    assert len(dm._val["code"].tokens) == 1000 and len(dm._test["code"].tokens) == 200  # 0.25 and 0.05 of 4000
    assert len(dm._train["code"].tokens) == 2800
    assert train and val and test and not train & val and not (train | val) & test
    with pytest.raises(ValueError, match=r"data\.domains\.code: its validation files give 10 bytes"):
        split_names(monkeypatch, tmp_path, tmp_path / "one", library, max_bytes_per_domain=40)


def test_python_code_reads_offline_and_from_its_cache(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("python-code tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    library = python_tree(tmp_path / "one", NAMES)
    first, _ = split_names(monkeypatch, tmp_path, tmp_path / "one", library)
    cached = sorted(os.listdir(tmp_path / "cache" / "generator"))
    assert len(cached) >= 2  # one cached dataset per split
    assert split_names(monkeypatch, tmp_path, tmp_path / "one", library)[0] == first
    assert sorted(os.listdir(tmp_path / "cache" / "generator")) == cached


def test_python_code_cannot_share_a_domain_or_hold_one_file(tmp_path, monkeypatch, corpus):
    library = python_tree(tmp_path / "one", ["only.py"])
    monkeypatch.setitem(
        domains_module.PRESETS, "python-code", lambda: domains_module.python_code_sources([tmp_path / "one"], [library])
    )
    with pytest.raises(ValueError, match=r"data\.domains\.code: splitting by file needs ≥ 3 files, found 1"):
        TextDomains({"code": "python-code"}, block_size=4, cache_dir=str(tmp_path / "cache")).setup("fit")
    mixed = {"code": ["python-code", str(corpus / "b" / "notes.md")]}
    with pytest.raises(ValueError, match=r"data\.domains\.code: python-code is split by file and cannot share"):
        TextDomains(mixed, block_size=4, cache_dir=str(tmp_path / "cache")).setup("fit")


def test_python_code_preset_reads_the_interpreter_prefix(tmp_path):
    sources = domains_module.resolve_domain("code", "python-code")
    names = {s.name for s in sources}
    assert {"os.py", "json/decoder.py", "torch/__init__.py", "lightning/__init__.py"} <= names
    assert not any(os.path.isabs(name) or "__pycache__" in name for name in names)
    dm = TextDomains({"code": "python-code"}, block_size=64, max_bytes_per_domain=60_000, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.summary()["code"]["bytes"] == 60_000
    assert b"def " in bytes(dm._train["code"].tokens.numpy())
