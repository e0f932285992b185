"""A tiny tile-stage output written by hand, exactly in the layout of the contract (for features tests).

`write_fake_tiles(tile_dir, scenes, size)` cuts each (scene_id, split, rgb (H, W, 3) uint8, mask (H, W)
uint8 0/1/255) into size x size GeoTIFF patches (image + `_mask`), and writes `scenes/<id>.csv` and
`manifest.csv` with the contract's columns. It lets the features tests control ignore pixels and empty
patches precisely, independently of the tile stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.transform import from_origin

CRS = "EPSG:32633"
GSD = 0.5


def write_fake_tiles(tile_dir: Path, scenes: list[tuple[str, str, np.ndarray, np.ndarray]], size: int) -> Path:
    rows = []
    for scene_id, split, rgb, mask in scenes:
        h, w = mask.shape
        origin = from_origin(500_000.0, 4_000_000.0, GSD, GSD)
        for r in range(0, h, size):
            for c in range(0, w, size):
                img = np.zeros((3, size, size), np.uint8)
                msk = np.full((size, size), 255, np.uint8)  # padding outside the scene is ignore
                vh, vw = min(size, h - r), min(size, w - c)
                img[:, :vh, :vw] = np.moveaxis(rgb[r : r + vh, c : c + vw], -1, 0)
                msk[:vh, :vw] = mask[r : r + vh, c : c + vw]
                pid = f"{scene_id}_r{r:05d}_c{c:05d}"
                rel_img = Path("patches") / scene_id / f"{pid}.tif"
                rel_msk = Path("patches") / scene_id / f"{pid}_mask.tif"
                (tile_dir / rel_img).parent.mkdir(parents=True, exist_ok=True)
                transform = origin @ rasterio.Affine.translation(c, r)
                prof = dict(driver="GTiff", width=size, height=size, crs=CRS, transform=transform)
                with rasterio.open(tile_dir / rel_img, "w", count=3, dtype="uint8", **prof) as dst:
                    dst.write(img)
                with rasterio.open(tile_dir / rel_msk, "w", count=1, dtype="uint8", **prof) as dst:
                    dst.write(msk, 1)
                minx, maxy = transform @ (0, 0)
                maxx, miny = transform @ (size, size)
                rows.append({
                    "patch_id": pid, "scene_id": scene_id, "image_file": f"{scene_id}.png",
                    "label_file": f"{scene_id}.json", "subset": "", "split": split, "row_off": r, "col_off": c,
                    "size": size, "valid_row_off": 0, "valid_col_off": 0, "valid_height": vh,
                    "valid_width": vw, "minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy, "crs": CRS,
                    "building_frac": float((msk == 1).sum()) / max(1, int((msk != 255).sum())),
                    "nodata_frac": float((msk == 255).mean()),
                    "building_px": int((msk == 1).sum()), "background_px": int((msk == 0).sum()),
                    "class_px": f"{int((msk == 0).sum())} {int((msk == 1).sum())}", "labelled": True,
                    "image_path": rel_img.as_posix(), "mask_path": rel_msk.as_posix(),
                })
    df = pd.DataFrame(rows)
    (tile_dir / "scenes").mkdir(parents=True, exist_ok=True)
    for scene_id, part in df.groupby("scene_id"):
        part.to_csv(tile_dir / "scenes" / f"{scene_id}.csv", index=False)
    df.to_csv(tile_dir / "manifest.csv", index=False)
    return tile_dir
