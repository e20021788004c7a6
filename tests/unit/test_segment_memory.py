"""Whole-slide segmentation memory is bounded by the tile, not the slide (issue 3, item 1).

The same four tubule sections are placed on a 4,096² slide and on a 49,152² one (2.4
gigapixels: a whole-slide label image alone would be 9.7 GB), and `segment.stage.segment` (the real
stage: OME-Zarr slide, tubule GeoJSON, label zarr written atomically; classical segmenter, so
the test needs no model) runs on each in a fresh process. Peak RSS must not grow with the slide.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys
from pathlib import Path
import numpy as np, zarr
from shapely.geometry import Polygon
from cellstage.segment.stage import segment
from cellstage.demo.render import render_section
from cellstage.io.annotations import write_polygons_geojson
from cellstage.io.omezarr import ngff_multiscales

size, out = int(sys.argv[1]), Path(sys.argv[2])
sec = render_section(7, size=1024, n_tubules=2, tubule_radius=(200.0, 240.0))
root = zarr.open_group(str(out / "slide.ome.zarr"), mode="w", zarr_format=3)
s0 = root.create_array("s0", shape=(3, size, size), chunks=(1, 512, 512), dtype="uint8", fill_value=255)
root.attrs["ome"] = ngff_multiscales("slide", 0.17, 1)
rois = []
for k, (y, x) in enumerate([(0, 0), (0, size - 1024), (size - 1024, 0), (size - 1024, size - 1024)]):
    s0[:, y:y + 1024, x:x + 1024] = np.moveaxis(sec.image, 2, 0)  # only these chunks are stored
    rois += [(f"s{k}t{j}", Polygon(np.asarray(p, float) + (x, y))) for j, p in enumerate(sec.tubules)]
write_polygons_geojson(rois, out / "tubules.geojson", classification="Tubule")
del sec, s0, root
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark: measure the stage alone
rss0 = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
stats = segment(out / "slide.ome.zarr", out / "tubules.geojson", None, out / "labels.zarr",
                method="classical", tile=1024, overlap=128, diameter=None, threads=1)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": hwm / 1024, "rss_before_mb": rss0 / 1024, "n_nuclei": stats["n_nuclei"],
                  "n_tiles": stats["n_tiles"]}))
'''


def _peak(tmp_path: Path, size: int) -> dict:
    out = tmp_path / str(size)
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(size), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_segmentation_peak_memory_does_not_grow_with_the_slide(tmp_path):
    small = _peak(tmp_path, 4096)
    big = _peak(tmp_path, 49152)
    print(f"\npeak RSS 4096²: {small}; 49152²: {big}")
    # the same nuclei are found on both slides (the tiles see the same pixels)
    assert small["n_nuclei"] > 100 and abs(big["n_nuclei"] - small["n_nuclei"]) <= 0.02 * small["n_nuclei"]
    assert big["peak_rss_mb"] <= 1.15 * small["peak_rss_mb"] + 50, (small, big)
    assert big["peak_rss_mb"] < 800, big  # ~0.4 GB measured; one whole label image would be 9.7 GB
