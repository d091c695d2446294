"""Render ../results.md from the measured files in this folder (nothing in the report is typed by hand).

    python docs/results/build.py [--import GRIDS_DIR]

``--import`` first copies the small outputs of the runs (results.csv/json/md, spectrum.json, capture.json and
the PNGs; no adapters, no run folders) from the folders named in ``report.inputs.SOURCES`` under GRIDS_DIR into
this folder. Every number in results.md is read from those files here; the sections live in the ``report``
package beside this script, which formats and computes with the experiments' own code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the report package sits beside this script (docs/ is not an installed package)
    sys.path.insert(0, str(HERE))

from report import inputs  # noqa: E402
from report.ablations import variant_differences  # noqa: E402
from report.coverage import FULL_GRID_METHODS, SMOLLM2_GRID_METHODS, coverage_table, smollm2_coverage  # noqa: E402
from report.document import render_report  # noqa: E402
from report.headline import readme_with_headline, write_readme_headline  # noqa: E402
from report.inputs import HEADLINE_START, REPORT, import_outputs  # noqa: E402
from report.paper import paper_section  # noqa: E402

__all__ = ["FULL_GRID_METHODS", "HEADLINE_START", "SMOLLM2_GRID_METHODS", "coverage_table", "inputs",
           "paper_section", "readme_with_headline", "render_report", "smollm2_coverage", "variant_differences"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--import", dest="grids", type=Path, help="copy the outputs from this folder first")
    args = parser.parse_args()
    if args.grids:
        import_outputs(args.grids)
    REPORT.write_text(render_report())
    print(f"wrote {REPORT}")
    write_readme_headline()


if __name__ == "__main__":
    main()
