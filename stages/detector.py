"""DVC stage `detector`: U-Net real-only vs real+synthetic per method, on held-out real images.

usage: python stages/detector.py PARAMS SPLIT_MANIFEST REFINED_MANIFEST QC_TABLE OUT_DIR
"""

from defectforge.evaluate import run_detector
from defectforge.params import load_params
from defectforge.stage import stage


@stage
def main(params: str, split: str, refined: str, qc: str, out_dir: str) -> None:
    run_detector(load_params(params).detector, split, refined, qc, out_dir)


if __name__ == "__main__":
    main()
