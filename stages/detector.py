"""DVC stage `detector`: U-Net real-only vs real+synthetic per method, on held-out real images.

usage: python stages/detector.py PARAMS SPLIT_MANIFEST REFINED_MANIFEST QC_TABLE OUT_DIR
"""

from defectforge.params.detector import DetectorParams
from defectforge.params.loader import load_section
from defectforge.pipeline import detector
from defectforge.pipeline.entry import stage


@stage
def main(params: str, split: str, refined: str, qc: str, out_dir: str) -> None:
    detector.run(load_section(params, "detector", DetectorParams), split, refined, qc, out_dir)


if __name__ == "__main__":
    main()
