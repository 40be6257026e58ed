"""DVC stage `release`: the versioned manifest and dataset card.

usage: python stages/release.py PARAMS GENERATED_DIR OUT_DIR
"""

from defectforge.params import load_params
from defectforge.pipeline import run_release
from defectforge.stage import stage


@stage
def main(params: str, generated: str, out_dir: str) -> None:
    run_release(load_params(params).release, generated, out_dir)


if __name__ == "__main__":
    main()
