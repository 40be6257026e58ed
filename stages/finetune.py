"""DVC stage `finetune`: one checkpoint per (category, defect type), Eq. 5 loss, training curve.

usage: python stages/finetune.py PARAMS SPLIT_MANIFEST PRETRAIN_DIR OUT_DIR
"""

from defectforge.config import load_params
from defectforge.pipeline import finetune
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, pretrain_dir: str, out_dir: str) -> None:
    p = load_params(params)
    finetune.run(p.finetune, split, pretrain_dir, out_dir, needed=p.generate.model_needs())


if __name__ == "__main__":
    main()
