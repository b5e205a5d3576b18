"""The output contract (simdiff/core/outputs.py): regression tests for issue 8's write-side defects 1, 2, 3, 5, 9, 10.

Each test drives the command line or the Python API the way a user would and asserts that no data is lost:
inputs byte-identical, user folders untouched, one clear line (exit 2) for what is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny, write_calibration_text

import simdiff
import simdiff.workflows.api  # the module whose functions the tests patch (simdiff imports it lazily)
from simdiff.cli.main import main
from simdiff.core.errors import SimdiffError

CALIB = ["--samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_calibration_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture
def model(tmp_path) -> Path:
    """A tiny 6-layer llama checkpoint in ``tmp_path/parent/model``."""
    return save_tiny("llama", tmp_path / "parent" / "model")


def tree_hash(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative names), to assert that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Hidden entries our runs create beside an output (.NAME.tmp-*, .NAME.old-*, .NAME.simdiff-lock)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def prune_args(model: Path | str, out: Path | str, calib: Path, *extra: str) -> list[str]:
    return ["-q", "prune", str(model), "--calib", str(calib), *CALIB, "--num-layers", "2", "--out", str(out), *extra]


def run_bad(capsys, args: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2 and exactly one 'simdiff: error:' line."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("simdiff: error:") and "Traceback" not in err, err
    assert sum(line.startswith("simdiff: error:") for line in lines) == 1, err
    return lines[-1]


def api_prune(model: Path | str, out: Path | str, calib: Path, **kwargs) -> simdiff.PruneResult:
    return simdiff.prune(str(model), out, num_layers=2, calibration=simdiff.Calibration(str(calib), 4, 32, 2), **kwargs)


def no_model_work(monkeypatch) -> None:
    """Make loading a model fail loudly: what a test rejects must be rejected before any model work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was validated")

    monkeypatch.setattr("simdiff.model.load.load_model", refuse)  # every command loads through it (load_from_settings)


# -- defect 1: what appears at --out during a run is never deleted; concurrent runs -------------------------
def test_folder_created_during_the_run_is_kept(model, calib, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_remove = simdiff.workflows.api.remove_layers

    def user_creates_out(*args, **kwargs):
        out.mkdir()
        (out / "mine.txt").write_text("the user's file")
        return real_remove(*args, **kwargs)

    monkeypatch.setattr("simdiff.workflows.api.remove_layers", user_creates_out)
    with pytest.raises(SimdiffError, match="appeared while simdiff was running|created or changed by someone"):
        api_prune(model, out, calib)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "the user's file"
    assert leftovers(tmp_path) == []


def test_second_run_to_the_same_out_is_refused_while_the_first_runs(model, calib, tmp_path, monkeypatch):
    """A second prune starting while the first is running (same --out) fails at once; the first one's result stands."""
    out = tmp_path / "out"
    real_remove = simdiff.workflows.api.remove_layers
    second: dict = {}

    def start_second_run(*args, **kwargs):
        monkeypatch.setattr("simdiff.workflows.api.remove_layers", real_remove)
        try:
            second["result"] = api_prune(model, out, calib, criterion="reverse")
        except SimdiffError as exc:
            second["error"] = str(exc)
        return real_remove(*args, **kwargs)

    monkeypatch.setattr("simdiff.workflows.api.remove_layers", start_second_run)
    first = api_prune(model, out, calib, criterion="random", options=simdiff.Options(seed=3))
    assert "result" not in second, "both runs reported success: the second was silently replaced"
    assert f"another simdiff run (pid {os.getpid()}) is writing" in second["error"]
    assert json.loads((out / "simdiff.json").read_text())["removed_layers"] == first.selection.removed
    assert leftovers(tmp_path) == []


def test_claim_without_flock_falls_back_to_the_pid_in_the_lock_file(tmp_path, monkeypatch):
    """Some NFS/Lustre mounts refuse flock: the claim then relies on the pid it writes into the lock file."""
    from simdiff.core.outputs import claim_output_dir

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("simdiff.core.outputs.fcntl.flock", no_flock)
    out = tmp_path / "out"
    busy = f"another simdiff run \\(pid {os.getpid()}\\) is writing"
    with claim_output_dir(out), pytest.raises(SimdiffError, match=busy):
        claim_output_dir(out)
    (tmp_path / ".out.simdiff-lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")  # a killed run's
    with claim_output_dir(out) as claim, claim.staging() as staging:
        (staging / "simdiff.json").write_text("{}")
    assert (out / "simdiff.json").is_file() and leftovers(tmp_path) == []


# -- defect 2: --overwrite never deletes inputs, caches or unrelated folders --------------------------------
def test_overwrite_refuses_the_input_model_itself(model, calib, capsys):
    before = tree_hash(model)
    message = run_bad(capsys, prune_args(model, model, calib, "--overwrite"))
    assert "overlaps the input" in message
    assert tree_hash(model) == before


def test_overwrite_refuses_a_folder_containing_the_input(model, calib, capsys):
    parent = model.parent
    (parent / "notes.txt").write_text("unrelated")
    before = tree_hash(parent)
    message = run_bad(capsys, prune_args(model, parent, calib, "--overwrite"))
    assert "overlaps the input" in message
    assert tree_hash(parent) == before


def test_overwrite_refuses_the_model_cache(model, calib, tmp_path, monkeypatch, capsys):
    """The built-in model's cached checkpoint (and the cache folder) can never be an --out."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIMDIFF_CACHE", str(cache))
    cached = save_tiny("llama", cache / "models" / "smollm2-135m")  # stands in for the converted built-in model
    before = tree_hash(cache)
    message = run_bad(capsys, prune_args("smollm2-135m", cached, calib, "--overwrite"))
    assert "overlaps the input" in message or "overlaps the model cache" in message
    message = run_bad(capsys, prune_args(model, cache, calib, "--overwrite"))
    assert "overlaps the model cache" in message
    assert tree_hash(cache) == before


def test_overwrite_refuses_a_folder_that_is_not_a_simdiff_output(model, calib, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not a model")
    message = run_bad(capsys, prune_args(model, out, calib, "--overwrite"))
    assert "is not a simdiff output (no simdiff.json)" in message
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_overwrite_replaces_an_earlier_output_and_a_symlink_leaves_nothing_behind(model, calib, tmp_path):
    """Defect 9 (symlink part): --overwrite onto a link to an earlier output left `.link.old-PID` behind."""
    earlier = tmp_path / "earlier"
    assert main(prune_args(model, earlier, calib)) == 0
    earlier_files = tree_hash(earlier)
    link = tmp_path / "link"
    link.symlink_to(earlier, target_is_directory=True)
    assert main(prune_args(model, link, calib, "--overwrite", "--criterion", "reverse")) == 0
    assert not link.is_symlink() and json.loads((link / "simdiff.json").read_text())["criterion"] == "reverse"
    assert tree_hash(earlier) == earlier_files  # the link was replaced, never what it pointed to
    assert leftovers(tmp_path) == []


# -- defect 3: single-file outputs ------------------------------------------------------------------------
def score_args(model: Path, calib: Path, *extra: str) -> list[str]:
    return ["-q", "score", str(model), "--criterion", "simdiff", "--calib", str(calib), *CALIB, *extra]


@pytest.mark.parametrize("command", ["score --json", "score --plot", "eval --json"])
def test_existing_result_file_is_not_replaced_without_overwrite(command, model, calib, tmp_path, capsys,
                                                                 monkeypatch):
    name, flag = command.split()
    existing = tmp_path / ("result.png" if flag == "--plot" else "result.json")
    existing.write_text("precious")
    args = (score_args(model, calib, flag, str(existing)) if name == "score" else
            ["-q", "eval", str(model), "--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "200", flag,
             str(existing)])
    no_model_work(monkeypatch)
    message = run_bad(capsys, args)
    assert f"{flag} {str(existing)!r} already exists; pass --overwrite" in message
    assert existing.read_text() == "precious"


def test_result_file_created_during_the_run_is_kept(model, calib, tmp_path, capsys, monkeypatch):
    target = tmp_path / "scores.json"
    real_score = simdiff.workflows.api.score

    def user_writes_the_file(*args, **kwargs):
        target.write_text("the user's file")
        return real_score(*args, **kwargs)

    monkeypatch.setattr("simdiff.workflows.api.score", user_writes_the_file)
    message = run_bad(capsys, score_args(model, calib, "--json", str(target)))
    assert str(target) in message and re.search("already exists|appeared while simdiff was running", message)
    assert target.read_text() == "the user's file" and leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_file_of_the_input_model(model, calib, capsys, monkeypatch):
    config = model / "config.json"
    before = tree_hash(model)
    no_model_work(monkeypatch)
    message = run_bad(capsys, score_args(model, calib, "--json", str(config), "--overwrite"))
    assert "overlaps the input" in message
    assert tree_hash(model) == before


def test_score_writes_json_and_plot_atomically_creating_the_folder(model, calib, tmp_path):
    """`--json` into a missing folder creates it (documented choice); --overwrite replaces an earlier file."""
    json_file, plot = tmp_path / "new" / "sub" / "scores.json", tmp_path / "plots" / "scores.svg"
    assert main(score_args(model, calib, "--json", str(json_file), "--plot", str(plot))) == 0
    assert json.loads(json_file.read_text())["scores"]["simdiff"]
    assert plot.read_text().lstrip().startswith("<?xml")
    json_file.write_text("old")
    assert main(score_args(model, calib, "--json", str(json_file), "--overwrite")) == 0
    assert json.loads(json_file.read_text())["num_layers"] == 6
    assert leftovers(json_file.parent) == [] and leftovers(plot.parent) == []


# -- defect 5: provenance across pruning rounds -------------------------------------------------------------
def test_second_round_records_original_indices_and_history(model, calib, tmp_path):
    first, second = tmp_path / "round1", tmp_path / "round2"
    assert main(prune_args(model, first, calib)) == 0
    assert main(prune_args(first, second, calib, "--criterion", "reverse")) == 0
    one = json.loads((first / "simdiff.json").read_text())
    two = json.loads((second / "simdiff.json").read_text())
    # round 2 removed two layers of the 4-layer round-1 model; map them back through round 1's layer_map
    round2 = [one["layer_map"][str(i)] for i in two["history"][-1]["removed_layers"]]
    assert two["removed_layers"] == sorted(one["removed_layers"] + round2) and len(two["removed_layers"]) == 4
    assert two["kept_layers"] == [i for i in range(6) if i not in two["removed_layers"]]
    assert [h["criterion"] for h in two["history"]] == ["simdiff", "reverse"]
    assert two["history"][0]["removed_layers_original"] == one["removed_layers"]
    assert two["history"][1]["removed_layers_original"] == round2
    assert two["num_layers_original"] == 6 and two["original_model"] == str(model)
    # the layer_map is true: each layer of the final model holds the weights of that original layer
    original, final = load_file(model / "model.safetensors"), load_file(second / "model.safetensors")
    for new, old in two["layer_map"].items():
        key = "model.layers.{}.mlp.down_proj.weight"
        torch.testing.assert_close(final[key.format(new)], original[key.format(old)], rtol=0, atol=0)


# -- defect 9: leftovers of killed runs are removed by the next run -----------------------------------------
def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_a_killed_run_are_removed(model, calib, tmp_path):
    pid, here = dead_pid(), re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    tmp = tmp_path / f".out.tmp-{here}-{pid}-x1y2"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 4096)  # a half-written checkpoint
    (tmp_path / f".out.old-{here}-{pid}").mkdir()  # a half-deleted earlier output (out exists: it is not restored)
    (tmp_path / ".out.simdiff-lock").write_text(f"{pid} {socket.gethostname()}\n")
    alive = tmp_path / f".out.tmp-{here}-{os.getpid()}-live"  # belongs to a live process: kept
    alive.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "simdiff.json").write_text(json.dumps({"simdiff_output": {"schema": "simdiff-output/1", "files": {}}}))
    assert main(prune_args(model, out, calib, "--overwrite")) == 0
    assert leftovers(tmp_path) == [alive.name]


# -- defect 10 (outputs): bad output paths are refused before any model work -------------------------------
@pytest.mark.parametrize("out, pattern", [
    (".", "is or contains the current folder"),
    ("", "--out is empty"),
    ("/", "is the root folder"),
    ("{file}/out", "is a file, not a folder"),
])
def test_bad_out_is_refused_before_work(out, pattern, model, calib, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    (tmp_path / "file").write_text("a regular file")
    monkeypatch.chdir(work)
    no_model_work(monkeypatch)
    message = run_bad(capsys, prune_args(model, out.replace("{file}", str(tmp_path / "file")), calib, "--overwrite"))
    assert pattern in message
    assert [p.name for p in work.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("flag, name, pattern", [
    ("--plot", "scores.txt", "unknown extension '.txt'; use one of .png, .svg, .pdf"),
    ("--plot", "scores", "unknown extension '(none)'"),
    ("--json", "scores.yaml", "unknown extension '.yaml'; use one of .json"),
    ("--json", "{file}/scores.json", "is a file, not a folder"),
])
def test_bad_result_file_is_refused_before_work(flag, name, pattern, model, calib, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a regular file")
    no_model_work(monkeypatch)
    message = run_bad(capsys, score_args(model, calib, flag, str(tmp_path / name.replace("{file}", "file"))))
    assert pattern in message


def test_recover_checkpoints_inside_out_are_refused_before_work(model, tmp_path, monkeypatch, capsys):
    """Checkpoints written inside --out would make --out appear during the run (and be replaced at the end)."""
    monkeypatch.setattr("simdiff.recover.api.load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "recovered"
    message = run_bad(capsys, ["-q", "recover", str(model), "--out", str(out), "--checkpoint-dir", str(out / "ckpt"),
                               "--steps", "2"])
    assert "--checkpoint-dir" in message and "lies inside --out" in message
    message = run_bad(capsys, ["-q", "recover", str(model), "--out", str(out), "--checkpoint-dir", str(model)])
    assert "--checkpoint-dir" in message and "overlaps the input" in message
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.fixture
def mounted(tmp_path):
    """Mount helper (root only): ``mounted('tmpfs', size)`` or ``mounted('ro', folder)``; unmounted after."""
    points = []

    def mount(kind: str, arg) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        args = (["-t", "tmpfs", "-o", f"size={arg}", "tmpfs"] if kind == "tmpfs" else ["-o", "bind,ro", str(arg)])
        done = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", str(point)], check=False)


def test_read_only_folder_is_refused_before_work(model, calib, tmp_path, mounted, monkeypatch, capsys):
    (tmp_path / "ro-source").mkdir()
    read_only = mounted("ro", tmp_path / "ro-source")
    no_model_work(monkeypatch)
    message = run_bad(capsys, prune_args(model, read_only / "out", calib))
    assert "is not writable" in message


def test_full_disk_at_save_is_one_line_and_leaves_nothing(model, calib, tmp_path, mounted, capsys):
    small = mounted("tmpfs", "64k")  # the tiny checkpoint needs ~400 kB
    message = run_bad(capsys, prune_args(model, small / "out", calib))
    assert "no space left on device" in message.lower() and "nothing was written" in message
    assert list(small.iterdir()) == []


# -- issue 15 item 1: --overwrite trusts only a folder whose files simdiff recorded --------------------------
def manifest(folder: Path) -> dict[str, int]:
    """The files an output's simdiff.json records (relative path -> bytes)."""
    record = json.loads((folder / "simdiff.json").read_text())["simdiff_output"]
    assert record["schema"] == "simdiff-output/1"
    return record["files"]


def files_under(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["score", "eval"])
def test_result_file_named_simdiff_json_is_refused(name, model, calib, tmp_path, monkeypatch, capsys):
    """`score --json results/simdiff.json` made `results/` look like a simdiff output to a later --overwrite."""
    results = tmp_path / "results"
    args = (score_args(model, calib, "--json", str(results / "simdiff.json")) if name == "score" else
            ["-q", "eval", str(model), "--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "200",
             "--json", str(results / "SimDiff.json")])
    no_model_work(monkeypatch)
    assert "the name simdiff.json is reserved" in run_bad(capsys, args)
    assert not results.exists()


def test_overwrite_refuses_a_folder_whose_simdiff_json_holds_no_record(model, calib, tmp_path, monkeypatch, capsys):
    """A simdiff.json that is not ours (or from before the record) no longer licenses deleting the folder."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "simdiff.json").write_text(json.dumps({"scores": {"simdiff": [1.0, 2.0]}}))
    (results / "experiment.csv").write_text("step,loss\n1,2.5\n")
    before = tree_hash(results)
    no_model_work(monkeypatch)
    message = run_bad(capsys, prune_args(model, results, calib, "--overwrite"))
    assert "holds a simdiff.json without simdiff's record of the files it wrote" in message
    assert "delete it yourself, or choose another --out" in message
    assert tree_hash(results) == before


def test_overwrite_refuses_an_earlier_output_holding_anything_else(model, calib, tmp_path, monkeypatch, capsys):
    out, applied = tmp_path / "out", tmp_path / "applied"
    assert main(prune_args(model, out, calib)) == 0
    assert main(["-q", "apply", str(model), "--layers", "1", "--out", str(applied)]) == 0
    for folder in (out, applied):  # the record names every file written, with its size
        assert manifest(folder) == {k: v for k, v in files_under(folder).items() if k != "simdiff.json"}
        assert "model.safetensors" in manifest(folder)
    no_model_work(monkeypatch)
    (out / "notes.txt").write_text("mine")
    before = tree_hash(out)
    message = run_bad(capsys, prune_args(model, out, calib, "--overwrite"))
    assert f"--out {str(out)!r} holds 'notes.txt', which simdiff did not write there" in message
    (out / "notes.txt").unlink()
    (out / "extra").mkdir()
    assert "holds the folder 'extra'" in run_bad(capsys, prune_args(model, out, calib, "--overwrite"))
    (out / "extra").rmdir()
    with (out / "README.md").open("a") as card:
        card.write("my notes\n")
    assert "'README.md' changed since simdiff wrote it" in run_bad(capsys, prune_args(model, out, calib, "--overwrite"))
    after = {k: v for k, v in tree_hash(out).items() if k != "README.md"}
    assert after == {k: v for k, v in before.items() if k not in ("README.md", "notes.txt")}


# -- issue 15 item 2: without flock, another host's lock and leftovers are never taken over -----------------
def no_flock(monkeypatch) -> None:
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("simdiff.core.outputs.fcntl.flock", refuse)


def test_lock_fallback_never_takes_over_another_hosts_lock(tmp_path, monkeypatch):
    """On NFS/Lustre without flock a run on another node looked dead (os.kill here) and its lock was taken."""
    from simdiff.core.outputs import claim_output_dir

    no_flock(monkeypatch)
    out, lock = tmp_path / "out", tmp_path / ".out.simdiff-lock"
    for content, who in ((f"{dead_pid()} node-17.cluster\n", "on host node-17.cluster"),
                         (f"{dead_pid()}\n", "on an unknown host")):  # an older simdiff's lock: no host
        lock.write_text(content)
        with pytest.raises(SimdiffError, match=rf"is locked by simdiff process \d+ {who}.*delete the stale lock "
                                               rf"'{re.escape(str(lock))}' and rerun"):
            claim_output_dir(out)
        assert lock.read_text() == content and not out.exists()
    lock.write_text(f"{dead_pid()} {socket.gethostname()}\n")  # this host's dead run: taken over
    with claim_output_dir(out) as claim:
        assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with claim.staging() as staging:
            (staging / "simdiff.json").write_text("{}")
    assert manifest(out) == {} and leftovers(tmp_path) == []


def test_leftovers_of_another_host_or_without_a_host_are_never_deleted(model, calib, tmp_path, monkeypatch):
    pid = dead_pid()
    here = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    ours = tmp_path / f".out.tmp-{here}-{pid}-x1y2"  # this host's dead run: removed
    ours.mkdir()
    foreign = [tmp_path / f".out.tmp-node_17-{pid}-x1y2", tmp_path / f".out.old-node_17-{pid}",
               tmp_path / f".out.tmp-{pid}-x1y2"]  # another host's, and an older simdiff's (no host): kept
    for entry in foreign:
        entry.mkdir()
        (entry / "model.safetensors").write_bytes(b"\0" * 64)
    no_flock(monkeypatch)
    assert main(prune_args(model, tmp_path / "out", calib)) == 0
    assert leftovers(tmp_path) == sorted(p.name for p in foreign)
    assert all((p / "model.safetensors").read_bytes() == b"\0" * 64 for p in foreign)


# -- issue 15 item 3: extra files (GGUF export, evaluation) go through the contract; exit 3 when one fails ---
def test_gguf_export_is_added_under_the_claim_and_its_failure_exits_3(model, calib, tmp_path, monkeypatch, capsys):
    from test_gguf import write_tiny_gguf

    source = write_tiny_gguf(tmp_path / "tiny.gguf", blocks=6)  # stands in for the built-in model's GGUF file
    monkeypatch.setattr("simdiff.cli.export.check_export", lambda name, export, sliced=None, heal="none": source if export else None)
    out = tmp_path / "out"
    assert main(prune_args(model, out, calib, "--export", "gguf")) == 0
    assert manifest(out)["pruned.gguf"] == (out / "pruned.gguf").stat().st_size > 0
    assert leftovers(tmp_path) == []

    def disk_full_half_way(reader, metadata, tensors, path):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("simdiff.surgery.gguf.write_gguf", disk_full_half_way)
    failed = tmp_path / "failed"
    code = main(prune_args(model, failed, calib, "--export", "gguf"))
    err = capsys.readouterr().err
    assert code == 3, err
    (line,) = [line for line in err.splitlines() if line.startswith("simdiff: error:")]
    assert f"saved {str(failed)!r} (the pruned model, verified, complete), but NOT written: pruned.gguf" in line
    assert "No space left on device" in line and "Traceback" not in err
    assert not (failed / "pruned.gguf").exists() and "pruned.gguf" not in manifest(failed)
    assert manifest(failed) == {k: v for k, v in files_under(failed).items() if k != "simdiff.json"}
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    assert main(prune_args(model, failed, calib, "--overwrite")) == 0  # still an output of ours


def run_evaluate_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    recipe = Path(__file__).resolve().parents[1] / "docs" / "recipes" / "prune-evaluate.yaml"
    return ["-q", "run", str(recipe), "--model", str(model), "--criterion", "simdiff", "--calib", str(calib),
            *CALIB, "--num-layers", "2", "--tasks", "", "--eval-seq-len", "32", "--max-tokens", "200",
            "--out", str(out), *extra]


def test_run_evaluation_is_added_under_the_claim_and_its_failure_exits_3(model, calib, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "out"
    assert main(run_evaluate_args(model, calib, out)) == 0
    assert manifest(out)["evaluation.json"] == (out / "evaluation.json").stat().st_size
    assert json.loads((out / "evaluation.json").read_text())["simdiff"]["retained"]["ppl_ratio"]

    def evaluation_breaks(*args, **kwargs):
        raise RuntimeError("lm-eval broke")

    monkeypatch.setattr("simdiff.cli.evaluate.evaluate_against", evaluation_breaks)
    code = main(run_evaluate_args(model, calib, out, "--overwrite"))
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"saved {str(out)!r} (the pruned model, verified, complete), but NOT written: evaluation.json " \
           "(lm-eval broke)" in err
    assert not (out / "evaluation.json").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_checkpoint_rotation_deletes_only_what_simdiff_recorded(tmp_path):
    """`recover --keep-checkpoints` deleted any older step folder holding a trainer.json, with whatever else it held."""
    from simdiff.recover.checkpoint import save_checkpoint

    folder = tmp_path / "ckpt"

    def save(step: int) -> Path:
        return save_checkpoint(folder, step, {"w": torch.zeros(2)}, {"config": {}, "history": {}}, keep=2)

    first, second = save(1), save(2)
    (first / "notes.txt").write_text("mine")
    save(3)  # step 1 falls out of the two kept, but holds a file simdiff did not write: kept
    assert (first / "notes.txt").read_text() == "mine"
    save(4)  # step 2 is exactly what simdiff wrote: deleted
    assert not second.exists() and sorted(p.name for p in folder.iterdir()) == [
        first.name, "step-0000003", "step-0000004"]
