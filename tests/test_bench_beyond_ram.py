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
    assert io["file_bytes_read"] == io["reads"] * store["record_bytes"]
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
