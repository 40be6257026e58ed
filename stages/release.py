"""DVC stage `release`: the versioned manifest (with QC), metrics, HTML report and dataset card.

usage: python stages/release.py PARAMS SPLIT_MANIFEST REFINED_MANIFEST QUALITY_DIR DETECTOR_DIR OUT_DIR
"""

from defectforge.params.loader import load_section
from defectforge.params.release import ReleaseParams
from defectforge.pipeline import release
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, refined: str, quality: str, detector: str, out_dir: str) -> None:
    release.run(load_section(params, "release", ReleaseParams), refined, out_dir, quality=quality, detector=detector, split=split)


if __name__ == "__main__":
    main()
