"""DVC stage `refine`: dataset masks from the defect tokens' cross-attention (Eq. 13), raw masks kept.

usage: python stages/refine.py PARAMS SPLIT_MANIFEST GENERATED_DIR OUT_DIR
"""

from defectforge.evaluate import run_refine
from defectforge.params import load_params
from defectforge.stage import stage


@stage
def main(params: str, split: str, generated: str, out_dir: str) -> None:
    run_refine(load_params(params).refine, split, generated, out_dir)


if __name__ == "__main__":
    main()
