"""DVC stage `sample`: make the built-in sample dataset (MVTec AD layout).

usage: python stages/sample.py PARAMS OUT_DIR
"""

from defectforge.params import load_params
from defectforge.pipeline import run_sample
from defectforge.stage import stage


@stage
def main(params: str, out_dir: str) -> None:
    run_sample(load_params(params).sample, out_dir)


if __name__ == "__main__":
    main()
