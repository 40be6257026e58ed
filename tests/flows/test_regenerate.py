"""The Prefect flow against a real temporary Prefect server (prefect_test_harness)."""

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _small_params(tmp_path: Path) -> Path:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["sample"].update(size=64, n_train_good=6, n_test_good=3, n_defect=6)
    params["generate"].update(n_per_defect=3, shard_size=2)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return p


def test_flow_runs_the_dag_end_to_end(prefect_server, tmp_path):
    from flows.regenerate import regenerate
    from defectforge.manifest.io import read_manifest
    from defectforge.manifest.validate import validate_manifest

    params = _small_params(tmp_path)
    state = regenerate(str(params), str(tmp_path), return_state=True)
    assert state.is_completed(), state
    manifest = Path(state.result())
    assert manifest == tmp_path / "data/release/manifest.parquet"
    assert validate_manifest(manifest) == []
    df = read_manifest(manifest).to_pandas()
    assert len(df) == 4 * 3 and set(df["method"]) == {"copy-paste"}
    assert df["dataset_version"].str.startswith("sample@").all()


def test_transient_failure_is_retried(prefect_server, tmp_path, monkeypatch):
    from defectforge import pipeline
    from flows.regenerate import regenerate

    real = pipeline.run_split
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_split", flaky)
    state = regenerate(str(_small_params(tmp_path)), str(tmp_path), return_state=True)
    assert state.is_completed()
    assert len(calls) == 2


def test_bad_params_fail_without_retry(prefect_server, tmp_path):
    from flows.regenerate import regenerate

    params = _small_params(tmp_path)
    data = yaml.safe_load(params.read_text())
    data["data"]["root"] = str(tmp_path / "nowhere")
    data["data"]["layout"] = "folder"
    params.write_text(yaml.safe_dump(data))
    state = regenerate(str(params), str(tmp_path), return_state=True)
    assert state.is_failed()
    assert not (tmp_path / "data/manifests/source.parquet").exists()
