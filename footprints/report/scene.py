"""What a report is given of one scene (`ReportScene`), and the notes the page shows beside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affine import Affine

from .post import PostImagery


@dataclass
class ReportScene:
    """What the report shows of one scene; every path is optional.

    `footprints`: GeoJSON of predicted polygons (EPSG:4326, or pixel coordinates for a scene without
    CRS); a file holding several scenes is filtered on the `scene` property. `matches`: evaluate's
    matches GeoJSON (predictions with `status` TP/FP, truths with `kind` "truth" and `status` TP/FN),
    filtered on `scene`. `prob`: probability raster. `image`: the scene image; `image_transform`
    (an Affine or 6 GDAL numbers) and `image_crs` georeference an image file that carries none (xView2
    PNGs), for the image's own pixel grid; without them such an image is stretched over the probability
    raster's extent. `metrics`: evaluate's per-scene entry (`pixel`, `polygon`). `domain_score`: how unlike
    the model's training scenes predict found it (`footprints.model.domain`), when scored. `damage`: the
    damage stage's graded footprints GeoJSON (`damage` grade and `p_<grade>` probabilities per feature),
    filtered on `scene`. `post`: the scene's post-disaster imagery (a damage run's; `post.py`), drawn on the
    image's place; None: no such layer.
    """

    scene_id: str
    footprints: Path | None = None
    prob: Path | None = None
    image: Path | None = None
    image_transform: Affine | Sequence[float] | None = None
    image_crs: str | None = None
    matches: Path | None = None
    metrics: Mapping[str, Any] | None = None
    split: str | None = None
    notes: list[str] = field(default_factory=list)
    domain_score: float | None = None  # predict's (its scene record): near 0 = like the model's training scenes
    damage: Path | None = None
    post: PostImagery | None = None


def note(scene: ReportScene, text: str) -> None:
    """Add `text` to what the page says about `scene` (once: a note repeated by a re-render is not doubled)."""
    if text not in scene.notes:
        scene.notes.append(text)
