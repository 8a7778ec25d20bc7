"""Sphinx configuration for roman-tweakreg (builds offline)."""

project = "roman-tweakreg"
author = "roman-tweakreg developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
