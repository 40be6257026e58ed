"""DVC stage `finetune`: one checkpoint per (category, defect type), Eq. 5 loss, training curve.

usage: python stages/finetune.py PARAMS SPLIT_MANIFEST PRETRAIN_DIR OUT_DIR
"""

from defectforge.params.finetune import FinetuneParams
from defectforge.params.loader import load_section
from defectforge.params.needs import ModelNeeds
from defectforge.pipeline import finetune
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, pretrain_dir: str, out_dir: str) -> None:
    own = load_section(params, "finetune", FinetuneParams)
    generate = load_section(params, "generate", ModelNeeds)  # not the registry: a method edit does not rerun this stage
    finetune.run(own, split, pretrain_dir, out_dir, needed=generate.model_needs())


if __name__ == "__main__":
    main()
