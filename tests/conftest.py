"""Shared fixtures. Nothing here touches the network: analytics are off before any import."""

from __future__ import annotations

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="defectforge-test-home-")
for k, v in {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_HOME": os.path.join(_HOME, "prefect"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ[k] = v

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """A small built-in sample dataset (MVTec AD layout), made once per test session."""
    from defectforge.data.sample import make_sample

    root = tmp_path_factory.mktemp("sample") / "sample"
    make_sample(root, seed=0, size=64, n_train_good=6, n_test_good=3, n_defect=6)
    return root


@pytest.fixture(scope="session")
def sample_manifests(sample_root, tmp_path_factory):
    """(source manifest, split manifest) of the small sample."""
    from defectforge.params import DataParams, SplitParams
    from defectforge.pipeline import run_ingest, run_split

    out = tmp_path_factory.mktemp("manifests")
    source = run_ingest(DataParams(layout="mvtec", root=str(sample_root)), out / "source.parquet", progress=False)
    split = run_split(SplitParams(), source, out / "split.parquet")
    return source, split
