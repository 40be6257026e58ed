"""DVC stage `split`: seeded train/test (and fold) assignment of the real images.

usage: python stages/split.py PARAMS SOURCE_MANIFEST OUT_MANIFEST
"""

from defectforge.params.loader import load_section
from defectforge.params.split import SplitParams
from defectforge.pipeline import split
from defectforge.pipeline.entry import stage


@stage
def main(params: str, source: str, out: str) -> None:
    split.run(load_section(params, "split", SplitParams), source, out)


if __name__ == "__main__":
    main()
