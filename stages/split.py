"""DVC stage `split`: seeded train/test (and fold) assignment of the real images.

usage: python stages/split.py PARAMS SOURCE_MANIFEST OUT_MANIFEST
"""

from defectforge.params import load_params
from defectforge.pipeline import run_split
from defectforge.stage import stage


@stage
def main(params: str, source: str, out: str) -> None:
    run_split(load_params(params).split, source, out)


if __name__ == "__main__":
    main()
