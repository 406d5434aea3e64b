"""Quick mode of the beyond-RAM benchmark (issue 16): a direct store filled before training, read from the file
(never lazily) during it, figures in the JSON and the page written from it, the store deleted afterwards."""

import json
from pathlib import Path

import pytest
from bench_beyond_ram import main  # scripts/ is on the path (conftest.py)


def test_quick_run_reads_every_record_from_the_file_and_deletes_the_store(tmp_path):
    out, store_dir = tmp_path / "beyond_ram", tmp_path / "store"
    main(["--quick", "--out", str(out), "--store-dir", str(store_dir)])
    result = json.loads((out / "beyond_ram.json").read_text())
    store, training, io = result["store"], result["training"], result["training"]["store_io"]
    assert store["bytes"] == store["num_experts"] * store["record_bytes"] == 64 * store["record_bytes"]
    assert store["file_bytes_allocated"] >= store["bytes"], "every record is on the disk before training"
    assert io["reads"] > 0 and io["lazy_reads"] == 0, "every read comes from the file"
    # exact's first pass reads the parameters alone: a third of an Adam record (whole 4 KiB blocks of it)
    assert io["reads"] * store["record_bytes"] / 3 < io["file_bytes_read"] < io["reads"] * store["record_bytes"]
    assert io["bytes_written"] == io["writes"] * store["record_bytes"] > 0
    assert result["disk"]["read_bytes_per_s"] > 0 and training["read_bytes_per_s_in_io"] > 0
    assert training["steps"] == 3 and len(training["peak_rss_per_step_bytes"]) == 3
    assert 0 < result["whole_process_peak_rss_bytes"] < 8 * 2**30
    before, after = result["validation"][0], result["validation"][-1]
    assert before["step"] == 0 and after["step"] == 3
    assert result["store_deleted"] and not store_dir.exists()
    readme = (out / "README.md").read_text()
    assert f"{before['val/bpb']:.3f} → {after['val/bpb']:.3f}" in readme
    assert f"{training['tokens_per_s']:,.0f}" in readme and result["command"] in readme


def test_quick_needs_an_out_folder():
    with pytest.raises(SystemExit):
        main(["--quick"])


def test_checked_in_pages_are_their_json_rendered(tmp_path):
    """The results pages are written from their JSON (a hand edit of a page, or of a JSON without re-rendering, fails
    here); the allocator comparison on the main page comes from the default-allocator run's JSON."""
    import shutil

    from bench.beyond_ram import render, write_page

    results = Path(__file__).resolve().parents[1] / "scripts" / "results" / "beyond_ram"
    for folder in (results, results / "default_malloc"):
        copy = tmp_path / folder.relative_to(results.parent)
        shutil.copytree(folder, copy, dirs_exist_ok=True)
        write_page(copy)
        assert (copy / "README.md").read_text() == (folder / "README.md").read_text(), folder
    main_run = json.loads((results / "beyond_ram.json").read_text())
    default = json.loads((results / "default_malloc" / "beyond_ram.json").read_text())
    page = render(main_run, default)
    assert f"whole-process peak RSS {default['whole_process_peak_rss_bytes'] / 2**20:,.0f} MiB" in page


def test_quick_store_bound_run_compares_the_stores_on_one_model(tmp_path):
    """Issue 25's recipe: host, direct and direct behind a host tier train the same model on the same bytes; the
    page shows each store's traffic per step and per touched expert."""
    out = tmp_path / "store_bound"
    main(["--store-bound", "--quick", "--out", str(out), "--store-dir", str(tmp_path / "store")])
    result = json.loads((out / "store_bound.json").read_text())
    runs = {run["store"]: run for run in result["runs"]}
    assert list(runs) == ["host", "direct", "direct+tier"]
    for name, run in runs.items():
        assert len(run["steps"]) == 3 and len(run["counted"]) == 2, name
        assert [step["round"] for step in run["steps"]] == [0, 0, 1]
        for step in run["counted"]:
            touched, params, record = step["touched"], run["params_bytes"], run["record_bytes"]
            assert touched > 0 and step["reads"] <= 2 * touched
            # the first pass reads each touched expert's parameters, the second the rest or the whole record
            assert touched * (params + record - params) <= step["bytes_read"] <= touched * (params + record)
    direct, tiered = runs["direct"]["counted"], runs["direct+tier"]["counted"]
    assert all(step["disk_bytes_read"] > 0 for step in direct)
    assert sum(step["tier_hits"] for step in tiered) > 0
    assert sum(step["disk_bytes_read"] for step in tiered) < sum(step["disk_bytes_read"] for step in direct)
    assert [s["touched"] for s in runs["host"]["steps"]] == [s["touched"] for s in runs["direct"]["steps"]]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    assert set(result["paired_ratios"]) == {"direct", "direct+tier"}
    page = (out / "README.md").read_text()
    assert "`direct+tier`" in page and result["command"] in page


def test_checked_in_store_bound_pages_are_their_json_rendered(tmp_path):
    """The store-bound pages (after, and before issue 25) are written from their JSON."""
    import shutil

    from bench.beyond_ram import write_store_bound_page

    results = Path(__file__).resolve().parents[1] / "scripts" / "results" / "store_bound"
    for folder in (results, results / "before"):
        copy = tmp_path / folder.relative_to(results.parent)
        shutil.copytree(folder, copy, dirs_exist_ok=True)  # the main folder's copy holds its before/ too
        write_store_bound_page(copy)
        assert (copy / "README.md").read_text() == (folder / "README.md").read_text(), folder
