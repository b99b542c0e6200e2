"""Sphinx configuration for the lars_numba documentation.

Built by ``bash .ci/docs``: ``sphinx-build -W`` with the html and doctest
builders. Nothing here fetches from the network.
"""

import doctest
import os
import pathlib
import shutil

# The GPU examples run on Numba's CUDA simulator where there is no GPU, as the
# test suite's do; the switch must be set before numba is first imported.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import lars_numba

project = "lars_numba"
author = "lars_numba contributors"
copyright = "lars_numba contributors"
release = lars_numba.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    # MathJax from the package instead of a CDN: formulas render offline.
    "sphinx-mathjax-offline",
    "numpydoc",
]

exclude_patterns = ["_build"]
nitpicky = True
# Other projects' documentation is not linked (no intersphinx: the build
# stays offline), so references to Chainer, NumPy, CuPy or the standard
# library stay plain text.
nitpick_ignore_regex = [(r"py:.*", r"(chainer|numpy|cupy|fnmatch|numba)(\..*)?")]
templates_path = []
html_static_path = ["_static"]

# -- API reference -------------------------------------------------------------

autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters section already gives the types
numpydoc_show_class_members = False  # each class lists its own attributes
numpydoc_class_members_toctree = False
# Names in numpydoc's type fields that are not documented here are plain text.
numpydoc_xref_param_type = False

# -- doctest -------------------------------------------------------------------

# DOCS lets examples run the scripts in docs/examples wherever sphinx-build starts.
doctest_global_setup = f"""
import pathlib

import numpy as np
import lars_numba

DOCS = pathlib.Path({str(pathlib.Path(__file__).resolve().parent)!r})
"""
doctest_default_flags = (
    doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
)
# ">>>" blocks are tested too, the API pages' docstring examples among them.
doctest_test_doctest_blocks = "default"

# -- HTML ----------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"lars_numba {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 5,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
# The header lists every page; a left sidebar would only repeat it.
html_sidebars = {"**": []}
# MathJax is loaded from its CDN by the reader's browser, not at build time.
