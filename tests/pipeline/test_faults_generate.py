"""Faults met by the generate stage end in one line and exit status 2, and a run that committed no
shard leaves nothing behind: a full disk (any writer: PNG or Parquet shard), a file named like a
shard that is not one, a --checkpoints folder without checkpoints, a generate.scheduler where no
Dask scheduler listens. A bad data.mask_rule is refused when params load."""

from __future__ import annotations

import errno
import socket

import pytest
from cli_helpers import run_cli

from defectforge.errors import ParamsError
from defectforge.params.file import parse_params

PARAMS = "generate:\n  methods: [copy-paste]\n  n_per_defect: 2\n  shard_size: 2\n"


@pytest.fixture
def setup(sample_manifests, tmp_path):
    _, split = sample_manifests
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    return split, params


def _one_error(r) -> str:
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return errors[0]


def _no_room(code: int, after: int):
    calls = [0]

    def write(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "File too large")
        return write.real(*args, **kwargs)

    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
@pytest.mark.parametrize("writer", ["png", "shard"])
def test_disk_full_is_one_line_and_leaves_no_plan(setup, tmp_path, monkeypatch, code, writer):
    from defectforge.manifest.io import ShardedWriter
    from defectforge.pipeline import generate

    split, params = setup
    if writer == "png":  # the third image write fails, before any shard is committed
        fake = _no_room(code, 2)
        fake.real = generate.atomic_write_bytes
        monkeypatch.setattr(generate, "atomic_write_bytes", fake)
    else:  # pyarrow's "Error writing bytes to file" carries the errno
        fake = _no_room(code, 0)
        fake.real = ShardedWriter.write
        monkeypatch.setattr(ShardedWriter, "write", fake)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "gen", tmp_path / "empty"):
        line = _one_error(run_cli("generate", "--split", split, "--out", out, "--params", params))
        assert str(out) in line and ("No space left" in line or "File too large" in line), line
        # no plan file, empty manifest folder or orphan image that would look like a started output
        left = sorted(p.relative_to(tmp_path).as_posix() for p in out.rglob("*")) if out.exists() else []
        assert left == [], left
    assert not (tmp_path / "gen").exists()


def test_disk_full_after_a_committed_shard_keeps_it_for_resume(setup, tmp_path, monkeypatch):
    from defectforge.manifest.io import ShardedWriter
    from defectforge.manifest.validate import PLAN_FILE

    split, params = setup
    fake = _no_room(errno.ENOSPC, 1)
    fake.real = ShardedWriter.write
    monkeypatch.setattr(ShardedWriter, "write", fake)
    out = tmp_path / "gen"
    _one_error(run_cli("generate", "--split", split, "--out", out, "--params", params))
    assert (out / "copy-paste" / PLAN_FILE).is_file() and len(list(out.glob("copy-paste/manifest/part-*.parquet"))) == 1
    monkeypatch.undo()
    assert run_cli("generate", "--split", split, "--out", out, "--params", params).returncode == 0


@pytest.mark.parametrize("where", ["planned", "outside the plan"])
def test_junk_file_named_like_a_shard_is_one_line_naming_it(setup, tmp_path, where):
    split, params = setup
    out = tmp_path / "gen"
    assert run_cli("generate", "--split", split, "--out", out, "--params", params).returncode == 0
    shards = sorted((out / "copy-paste" / "manifest").glob("part-*.parquet"))
    junk = shards[-1] if where == "planned" else shards[-1].with_name("part-00042.parquet")
    junk.write_bytes(b"not parquet at all " * 20)  # long enough for "Parquet magic bytes not found"
    line = _one_error(run_cli("generate", "--split", split, "--out", out, "--params", params))
    assert str(junk) in line, line
    assert junk.read_bytes().startswith(b"not parquet")  # not the run's to delete


def test_checkpoints_folder_without_checkpoints(setup, tmp_path):
    split, params = setup
    empty = tmp_path / "no-checkpoints"
    empty.mkdir()
    out = tmp_path / "gen"
    line = _one_error(run_cli("generate", "--split", split, "--out", out, "--checkpoints", empty, "--method", "blended", "--params", params))
    assert str(empty) in line and "checkpoints.json" in line, line
    assert not out.exists()


def test_scheduler_where_nothing_listens(setup, tmp_path):
    split, _ = setup
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    params = tmp_path / "sched.yaml"
    params.write_text(PARAMS + f"  scheduler: {address}\n")
    out = tmp_path / "gen"
    line = _one_error(run_cli("generate", "--split", split, "--out", out, "--params", params))
    assert address in line and "generate.scheduler" in line, line
    assert not out.exists()


def test_client_that_cannot_connect_names_the_address(monkeypatch):
    """The Dask client's own failure (a socket that accepts but speaks no Dask) is one line too."""
    import distributed

    from defectforge.pipeline import fanout

    def refuse(*a, **k):
        raise OSError("Timed out trying to connect to tcp://10.0.0.9:8786 after 5 s")

    monkeypatch.setattr(fanout, "check_scheduler", lambda address: None)
    monkeypatch.setattr(distributed, "Client", refuse)
    with pytest.raises(ParamsError, match=r"generate.scheduler: no Dask scheduler answered at tcp://10.0.0.9:8786"):
        fanout.run_on_dask(print, (), 1, workers=1, scheduler="tcp://10.0.0.9:8786", progress=False)


@pytest.mark.parametrize("rule", ["{stem.nope}_mask.png", "{stem:>5000}_mask.png", "{stem!r}"])
def test_bad_mask_rule_is_refused_when_params_load(rule):
    with pytest.raises(ParamsError) as err:
        parse_params({"data": {"mask_rule": rule}})
    assert "data.mask_rule" in str(err.value) and "\n" not in str(err.value)
    assert parse_params({"data": {"mask_rule": "{category}/{stem}_mask.png"}}).data.mask_rule == "{category}/{stem}_mask.png"
