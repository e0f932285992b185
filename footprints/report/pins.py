"""The map library the report inlines: pinned name, version and registry integrity, and where its files are.

Kept apart from `build_assets` so that writing a report never imports the build tooling (and so that
`python -m footprints.report.build_assets` runs cleanly).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "leaflet"
VERSION = "1.9.4"
# `npm view leaflet@1.9.4 dist.integrity`: the registry's hash of the published tarball
INTEGRITY = "sha512-nxS1ynzJOmOlHp+iL3FyWqK89GtNL8U8rvlMOsQdTTssxZwCXh8N2NB3GDQOL+YR3XnWyZAxwQixURb+FA74PA=="
ASSETS = Path(__file__).resolve().parent / "assets"
SUMS = "SHA256SUMS"
