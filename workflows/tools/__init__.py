"""Tools that write the workflow files (``python -m workflows.tools.build``)."""
