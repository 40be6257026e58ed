"""DVC stage `pretrain`: the base diffusion model (tiny: trained here; pretrained: recorded).

usage: python stages/pretrain.py PARAMS SPLIT_MANIFEST OUT_DIR
"""

from defectforge.params.loader import load_section
from defectforge.params.needs import ModelNeeds
from defectforge.params.pretrain import PretrainParams
from defectforge.pipeline import pretrain
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, out_dir: str) -> None:
    own = load_section(params, "pretrain", PretrainParams)
    generate = load_section(params, "generate", ModelNeeds)  # not the registry: a method edit does not rerun this stage
    pretrain.run(own, split, out_dir, needed=generate.model_needs())


if __name__ == "__main__":
    main()
