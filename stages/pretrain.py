"""DVC stage `pretrain`: the base diffusion model (tiny: trained here; pretrained: recorded).

usage: python stages/pretrain.py PARAMS SPLIT_MANIFEST OUT_DIR
"""

from defectforge.config import load_params
from defectforge.pipeline import pretrain
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, out_dir: str) -> None:
    p = load_params(params)
    pretrain.run(p.pretrain, split, out_dir, needed=p.generate.model_needs())


if __name__ == "__main__":
    main()
