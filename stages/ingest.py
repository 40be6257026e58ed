"""DVC stage `ingest`: read the dataset folder named by params `data` into the source manifest.

usage: python stages/ingest.py PARAMS OUT_MANIFEST
"""

from defectforge.params.data import DataParams
from defectforge.params.loader import load_section
from defectforge.pipeline import ingest
from defectforge.pipeline.entry import stage


@stage
def main(params: str, out: str) -> None:
    ingest.run(load_section(params, "data", DataParams), out)


if __name__ == "__main__":
    main()
