"""The command line in-process, and a one-image manifest, for tests (``from cli_helpers import run_cli``)."""

from __future__ import annotations

import contextlib
import io
import subprocess


def run_cli(*args) -> subprocess.CompletedProcess:
    """``defectforge.cli.main`` in-process: exit status, stdout, stderr as a CompletedProcess.

    In-process saves a Python start and the torch / Great Expectations imports per call;
    test_cli.py::test_bad_params_key_stops_a_stage keeps one real subprocess end to end.
    """
    from defectforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["defectforge", *map(str, args)], code, out.getvalue(), err.getvalue())


def one_image_manifest(tmp_path, kind: str = "source", image_id: str = "cat/crack/000", **extra):
    """A ``kind`` manifest of one 16 px image with a 4 x 4 crack mask under ``tmp_path/data``; ``extra`` adds
    columns (a split manifest's ``split`` and ``fold``)."""
    import numpy as np

    from defectforge.data.files import sha256_file, write_png
    from defectforge.manifest.io import write_manifest

    data = tmp_path / "data"
    data.mkdir()
    write_png(data / "a.png", np.full((16, 16, 3), 90, np.uint8))
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    write_png(data / "a_mask.png", mask)
    row = dict(image_id=image_id, category="cat", defect_type="crack", image_path="a.png", mask_path="a_mask.png",
               width=16, height=16, image_sha256=sha256_file(data / "a.png"), mask_sha256=sha256_file(data / "a_mask.png"),
               mask_area=16, origin="test", **extra)
    return write_manifest([row], tmp_path / f"{kind}.parquet", kind=kind, dataset_root=data)
