"""DVC stage `generate`: synthetic defect images + masks + sharded manifest (resumable, fans out on Dask).

usage: python stages/generate.py PARAMS SPLIT_MANIFEST CHECKPOINTS_DIR OUT_DIR
"""

from defectforge.params.generate import GenerateParams
from defectforge.params.loader import load_section
from defectforge.pipeline import generate
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, checkpoints: str, out_dir: str) -> None:
    generate.run(load_section(params, "generate", GenerateParams), split, out_dir, checkpoints=checkpoints)


if __name__ == "__main__":
    main()
