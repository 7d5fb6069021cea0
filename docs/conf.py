"""Sphinx configuration: API reference from the docstrings (autodoc + napoleon, as PyG's docs)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import bgf_pyg  # noqa: E402

project = "bgf_pyg"
author = "bgf_pyg contributors"
release = version = bgf_pyg.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
# The docstrings are PyG style: Google "Args:" sections with reST roles and LaTeX math.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
add_module_names = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
