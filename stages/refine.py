"""DVC stage `refine`: dataset masks from the defect tokens' cross-attention (Eq. 13), raw masks kept.

usage: python stages/refine.py PARAMS SPLIT_MANIFEST GENERATED_DIR OUT_DIR
"""

from defectforge.params.loader import load_section
from defectforge.params.refine import RefineParams
from defectforge.pipeline import refine
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, generated: str, out_dir: str) -> None:
    refine.run(load_section(params, "refine", RefineParams), split, generated, out_dir)


if __name__ == "__main__":
    main()
