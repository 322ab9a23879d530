"""Build-time generators of the documentation site (`mkdocs.yml` runs `hooks.py`): the config, command and file
schema references read from the code, the diagrams, and math rendered to MathML. Nothing here is imported by the
package."""
