"""prefect.yaml declares real deployments of the regeneration flow."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_deployments_point_at_the_flow_with_a_schedule_and_the_gpu_pool():
    from flows.regenerate import regenerate
    from defectforge.config import parse_params

    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for d in spec["deployments"]:
        # what a worker does first: load the entrypoint from the checkout
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"].split(":")[0]) + ":" + d["entrypoint"].split(":")[1])
        assert flow.name == regenerate.name and set(flow.parameters.properties) == set(regenerate.parameters.properties)
        assert d["work_pool"]["name"] == "gpu"
        assert d["schedules"][0]["cron"].count(" ") == 4
        # the parameters are ones the flow accepts, and overrides are valid params keys
        assert set(d["parameters"]) <= set(regenerate.parameters.properties)
        data = {}
        for key, value in d["parameters"]["params"].items():
            section, field = key.split(".")
            data.setdefault(section, {})[field] = value
        parse_params(data, "prefect.yaml")
