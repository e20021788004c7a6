"""python -m cellstage.demo OUT_DIR [--preset demo|tiny] [--seed N]"""

from __future__ import annotations

import argparse

from .generate import PRESETS, generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellstage.demo",
                                 description="Write the synthetic demo whole-slide data set.")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    tsv = generate(a.out_dir, a.preset, a.seed, progress=True)
    print(tsv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
