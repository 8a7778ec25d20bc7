"""Sphinx configuration for roman-tweakreg (builds offline)."""

project = "roman-tweakreg"
author = "roman-tweakreg developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False


def setup(app):
    """``.. report-fields:: fits`` (or ``images``): the report's columns, from their declaration."""
    from docutils import nodes
    from docutils.parsers.rst import Directive
    from docutils.statemachine import StringList

    from roman_tweakreg.report import fields_rst

    class ReportFields(Directive):
        required_arguments = 1

        def run(self):
            node = nodes.container()
            lines = StringList(fields_rst(self.arguments[0]).splitlines(), source="report.py")
            self.state.nested_parse(lines, self.content_offset, node)
            return node.children

    class SchemaKeys(Directive):
        """``.. schema-keys:: wcs_fit_results.fit``: a key table of the outputs' schema."""

        required_arguments = 1

        def run(self):
            from roman_tweakreg.report import schema_rst

            node = nodes.container()
            lines = StringList(schema_rst(self.arguments[0]).splitlines(), source="schema")
            self.state.nested_parse(lines, self.content_offset, node)
            return node.children

    app.add_directive("report-fields", ReportFields)
    app.add_directive("schema-keys", SchemaKeys)
    _parameters_directive(app)


def _parameters_directive(app):
    """``.. parameters:: relative``: a section's parameter table, from roman_tweakreg.parameters.

    With ``:all:``, also the parameters the step does not expose (DetectionParameters').
    """
    from docutils import nodes
    from docutils.parsers.rst import Directive, directives
    from docutils.statemachine import StringList

    from roman_tweakreg.matching import DERIVED
    from roman_tweakreg.parameters import table_rst

    class Parameters(Directive):
        required_arguments = 1
        option_spec = {"all": directives.flag}  # noqa: RUF012

        def run(self):
            node = nodes.container()
            text = table_rst(
                self.arguments[0], in_step="all" not in self.options, derived=DERIVED
            )
            lines = StringList(text.splitlines(), source="parameters.py")
            self.state.nested_parse(lines, self.content_offset, node)
            return node.children

    app.add_directive("parameters", Parameters)
