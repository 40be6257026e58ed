"""DVC stage `quality`: per-sample gates, FID/KID/IS/LPIPS/IC-LPIPS per set, set-level gates.

usage: python stages/quality.py PARAMS SPLIT_MANIFEST REFINED_MANIFEST OUT_DIR
"""

from defectforge.params.loader import load_section
from defectforge.params.quality import QualityParams
from defectforge.pipeline import quality
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, refined: str, out_dir: str) -> None:
    quality.run(load_section(params, "quality", QualityParams), split, refined, out_dir)


if __name__ == "__main__":
    main()
