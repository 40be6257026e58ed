"""DVC stage `ingest`: read the dataset folder named by params `data` into the source manifest.

usage: python stages/ingest.py PARAMS OUT_MANIFEST
"""

from defectforge.params import load_params
from defectforge.pipeline import run_ingest
from defectforge.stage import stage


@stage
def main(params: str, out: str) -> None:
    run_ingest(load_params(params).data, out)


if __name__ == "__main__":
    main()
