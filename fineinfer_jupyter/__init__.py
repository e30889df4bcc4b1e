"""fineinfer-jupyter: fine-tune and serve one model at once, from JupyterLab.

This module only holds the Jupyter and IPython hooks; everything heavy is imported lazily.
"""

__version__ = "0.1.0"


def _jupyter_server_extension_points():
    from .server.app import FineInferApp

    return [{"module": "fineinfer_jupyter", "app": FineInferApp}]


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "fineinfer-jupyter"}]


def load_ipython_extension(ipython):
    from .kernel.magics import load_ipython_extension as load

    load(ipython)
