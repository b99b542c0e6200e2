"""Make the dashboard ``asv publish`` wrote to ``html/`` open without a network.

asv's ``index.html`` loads jQuery, flot, Bootstrap, stupidtable and md5 from
CDNs. This copies them from Debian's packages into ``html/vendor/`` and
points the page at the copies, so the dashboard works offline::

    apt-get install -y libjs-jquery libjs-jquery-flot libjs-bootstrap \\
        libjs-jquery-stupidtable node-blueimp-md5
    python offline_html.py            # after asv publish, from asv_bench/

Debian ships flot 4, whose ``jquery.flot.js`` is a build that includes the
time, selection, categories and axis-label plugins asv loads one by one
for flot 0.8; its legend needs a background colour flot 0.8 gave it.
flot's orderBars plugin has no Debian package: without it, asv's bar charts
draw the bars of one group over each other instead of side by side.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

JS = Path("/usr/share/javascript")

#: The end of each CDN address in asv's index.html, and the Debian file that
#: replaces it; None drops the tag.
REPLACEMENTS = {
    "jquery-3.3.1.min.js": (JS / "jquery/jquery.min.js", "libjs-jquery"),
    "flot/0.8.3/jquery.flot.min.js": (JS / "jquery-flot/jquery.flot.js", "libjs-jquery-flot"),
    "flot/0.8.3/jquery.flot.time.min.js": None,
    "flot/0.8.3/jquery.flot.selection.min.js": None,
    "flot/0.8.3/jquery.flot.categories.min.js": None,
    "jquery.flot.orderBars.js": None,
    "stupidtable.min.js": (
        JS / "jquery-stupidtable/stupidtable.min.js",
        "libjs-jquery-stupidtable",
    ),
    "md5.min.js": (JS / "blueimp-md5/md5.min.js", "node-blueimp-md5"),
    "bootstrap.min.js": (JS / "bootstrap/js/bootstrap.min.js", "libjs-bootstrap"),
    "bootstrap.min.css": (JS / "bootstrap/css/bootstrap.min.css", "libjs-bootstrap"),
}

_TAG = re.compile(
    r'([ \t]*)<(?:script|link)\b[^>]*?(?:src|href)="(https://[^"]+)"[^>]*>(?:</script>)?\n?'
)

# flot 4's build has its own axisLabels plugin: with asv's copy too, every
# axis label is drawn twice.
_OWN_AXISLABELS = re.compile(
    r'[ \t]*<script\b[^>]*src="jquery\.flot\.axislabels\.js"[^>]*></script>\n?'
)
# flot 4 draws the legend as SVG over a rectangle it gives no fill (black), in
# a box sized by a guess at the labels' width that clips asv's longer ones.
_LEGEND_STYLE = (
    "<style>.legend { width: 22em !important; }"
    " .legendLayer rect.background { fill: #fff; }</style>"
)


def make_offline(html_dir: Path) -> list[str]:
    """Vendor the libraries into ``html_dir/vendor`` and rewrite its index.html.

    Returns the names of the files copied. Raises SystemExit naming the
    Debian package to install if a file is missing, and if index.html still
    refers to a CDN this function does not know.
    """
    index = html_dir / "index.html"
    if not index.exists():
        raise SystemExit(f"{index} not found: run `asv publish` first")
    needed = [entry for entry in REPLACEMENTS.values() if entry is not None]
    missing = sorted({package for path, package in needed if not path.exists()})
    if missing:
        raise SystemExit(f"missing Debian packages: apt-get install -y {' '.join(missing)}")
    vendor = html_dir / "vendor"
    vendor.mkdir(exist_ok=True)
    if (JS / "bootstrap/fonts").is_dir():
        # bootstrap.min.css finds its icon font at ../fonts/.
        shutil.copytree(JS / "bootstrap/fonts", html_dir / "fonts", dirs_exist_ok=True)
    copied = []

    def replace(match: re.Match) -> str:
        indent, url = match.groups()
        suffixes = [suffix for suffix in REPLACEMENTS if url.endswith(suffix)]
        if not suffixes:
            raise SystemExit(f"{index} loads {url}, which this script does not vendor")
        entry = REPLACEMENTS[suffixes[0]]
        if entry is None:
            return ""
        source = entry[0]
        shutil.copy2(source, vendor / source.name)
        copied.append(source.name)
        if source.suffix == ".css":
            return f'{indent}<link rel="stylesheet" href="vendor/{source.name}">\n'
        return f'{indent}<script src="vendor/{source.name}"></script>\n'

    page = _TAG.sub(replace, index.read_text())
    page = _OWN_AXISLABELS.sub("", page)
    if _LEGEND_STYLE not in page:
        page = page.replace("</head>", f"  {_LEGEND_STYLE}\n  </head>", 1)
    index.write_text(page)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?", type=Path, default=Path(__file__).parent / "html")
    args = parser.parse_args(argv)
    copied = make_offline(args.html_dir)
    print(f"{args.html_dir}: {len(copied)} libraries copied to vendor/: {', '.join(copied)}")


if __name__ == "__main__":
    sys.exit(main())
