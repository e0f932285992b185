"""xView2's damage grades: what a post-disaster label calls a building, and what a graded footprint carries.

One place for the names (labels, scoring, outputs, styles and the report all read them here).
"""

from __future__ import annotations

GRADES = ("no-damage", "minor-damage", "major-damage", "destroyed")
UNCLASSIFIED = "un-classified"  # xView2's unknown grade: neither trained on nor scored

# what a graded footprint carries (GeoJSON/GeoPackage properties): its grade, and each grade's probability
DAMAGE_KEY = "damage"
PROBABILITY_KEYS = {"no-damage": "p_no_damage", "minor-damage": "p_minor_damage", "major-damage": "p_major_damage",
                    "destroyed": "p_destroyed"}
# xView2's colours for the grades (R,G,B): the GeoPackage's default style and the HTML report's damage layer
GRADE_COLOURS = {"no-damage": "26,150,65", "minor-damage": "255,221,0", "major-damage": "253,141,60",
                 "destroyed": "215,25,28"}
