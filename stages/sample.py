"""DVC stage `sample`: make the built-in sample dataset (MVTec AD layout).

usage: python stages/sample.py PARAMS OUT_DIR
"""

from defectforge.params.loader import load_section
from defectforge.params.sample import SampleParams
from defectforge.pipeline import sample
from defectforge.pipeline.entry import stage


@stage
def main(params: str, out_dir: str) -> None:
    sample.run(load_section(params, "sample", SampleParams), out_dir)


if __name__ == "__main__":
    main()
