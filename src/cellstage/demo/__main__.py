"""python -m cellstage.demo OUT_DIR [--preset demo|tiny|smear|smear-tiny] [--seed N]"""

from __future__ import annotations

import argparse

from .generate import PRESETS, generate
from .smear import SMEAR_PRESETS, generate_smear


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellstage.demo",
                                 description="Write a synthetic demo whole-slide data set: PAS testis "
                                             "(demo, tiny) or AML bone-marrow smears (smear, smear-tiny).")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="demo", choices=sorted({*PRESETS, *SMEAR_PRESETS}))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.preset in SMEAR_PRESETS:
        tsv = generate_smear(a.out_dir, a.preset, a.seed, progress=True)
    else:
        tsv = generate(a.out_dir, a.preset, a.seed, progress=True)
    print(tsv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
